"""Experiment loggers (W&B offline by default, CSV, TensorBoard) and the end-of-run summary."""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from rift_bn.results import Results


def run_group(cfg: DictConfig, output_dir: Path) -> str:
    """W&B group: the sweep (its multirun folder) or, for a single run, the run folder."""
    if cfg.logger.get("group"):
        return str(cfg.logger.group)
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        if hc.mode is not None and hc.mode.name == "MULTIRUN":
            return "sweep-" + "-".join(Path(hc.sweep.dir).parts[-2:])
    except ValueError:
        pass
    return "run-" + "-".join(output_dir.parts[-2:])


def run_tags(cfg: DictConfig, job_type: str) -> list[str]:
    """data, model, seed and stage tags; method and k (``k:all`` for layer-type methods) for fine-tuning."""
    tags = [f"data:{cfg.data.name}", f"model:{cfg.model.name}", f"seed:{cfg.seed}", f"stage:{job_type}"]
    if job_type == "finetune":
        tags += [f"method:{cfg.method.name}", f"k:{cfg.k}" if cfg.method.selection == "mrc" else "k:all"]
    return tags + [str(t) for t in cfg.logger.get("tags") or []]


def run_name(cfg: DictConfig, job_type: str) -> str:
    """``<stage>-<data>-s<seed>``; fine-tuning adds ``-<method>-k<k>``, or ``-<method>-all`` for the
    layer-type methods (which ignore ``k``), matching the run's ``k:`` tag."""
    if job_type == "finetune":
        k = f"k{cfg.k}" if cfg.method.selection == "mrc" else "all"
        return f"{job_type}-{cfg.data.name}-{cfg.method.name}-{k}-s{cfg.seed}"
    return f"{job_type}-{cfg.data.name}-s{cfg.seed}"


class _LastStep:
    """Remembers the last step metrics went out at, so the summary row lands at the end of the curves."""

    last_step: int | None = None

    def note_step(self, step: int | None) -> None:
        if step is not None:
            self.last_step = step if self.last_step is None else max(self.last_step, step)


class SummaryCSVLogger(_LastStep, CSVLogger):
    """``metrics.csv``: per-epoch rows, then one row with the run's scalar summary (:func:`log_summary`)."""

    def log_metrics(self, metrics: dict[str, Tensor | float], step: int | None = None) -> None:
        self.note_step(step)
        super().log_metrics(metrics, step)


class SummaryTensorBoardLogger(_LastStep, TensorBoardLogger):
    """Per-epoch scalars, then the run's scalar summary at the last step (:func:`log_summary`)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.note_step(step)
        super().log_metrics(metrics, step)


class QuietWandbLogger(WandbLogger):
    """Lightning's WandbLogger without its two side effects on current wandb: it always passes
    ``anonymous`` to ``wandb.init`` (which warns "The anonymous setting has no effect" on every run), and
    ``offline=True`` sets ``WANDB_MODE=dryrun`` in the environment, which then reads back into every later
    config (``logger.mode: dryrun``). Give ``mode=`` (``offline``, ``online``, ...) instead of ``offline``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)


def wandb_mode(cfg: DictConfig) -> str:
    """The W&B mode of a run: ``WANDB_MODE`` if set, else ``logger.mode``; the legacy ``dryrun`` reads as
    ``offline`` (what it means), so configs and README agree."""
    mode = os.environ.get("WANDB_MODE") or str(cfg.logger.get("mode") or "offline")
    return "offline" if mode == "dryrun" else mode


def make_logger(cfg: DictConfig, output_dir: Path, job_type: str) -> Logger | None:
    """The logger chosen by ``logger=``; W&B runs are grouped by sweep, typed by stage, tagged by setting."""
    name = cfg.logger.name
    if name == "none":
        return None
    if name == "csv":
        return SummaryCSVLogger(save_dir=str(output_dir), name=f"csv-{job_type}")
    if name == "tensorboard":
        return SummaryTensorBoardLogger(save_dir=str(output_dir), name=f"tb-{job_type}")
    mode = wandb_mode(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    config["logger"]["mode"] = mode  # type: ignore[index]
    return QuietWandbLogger(
        project=cfg.logger.project,
        entity=cfg.logger.get("entity"),
        save_dir=str(output_dir),
        name=run_name(cfg, job_type),
        group=run_group(cfg, output_dir),
        job_type=job_type,
        tags=run_tags(cfg, job_type),
        mode=mode,
        config=config,
        log_model=False,
    )


def _numbers(prefix: str, values: Mapping[str, Any] | None) -> dict[str, float]:
    return {
        f"{prefix}/{k}": v
        for k, v in (values or {}).items()
        if isinstance(v, numbers.Real) and not isinstance(v, bool)
    }


def summary_scalars(results: Results) -> dict[str, float | int | None]:
    """The run's scalar summary: ``test/*`` (the final model), ``base/*``, ``delta/*``, ``alpha``, ``k``,
    ``n_selected``, ``stats/<metric>/{delta,ci_low,ci_high,p_value,n,gained,lost}``,
    ``corruptions/{base,final,delta}/<metric>`` (mean corruption accuracy, ``eval.corruptions``) and
    ``timings/<stage>`` (seconds). ``alpha`` and ``k`` are None where not used."""
    out: dict[str, float | int | None] = {
        **_numbers("test", results.final),
        **_numbers("base", results.base),
        **_numbers("delta", results.delta),
        "alpha": results.alpha,
        "k": results.experiment.k,
        "n_selected": len(results.selected),
    }
    for metric, stat in (results.stats or {}).items():  # paired base vs final: CI bounds, McNemar p
        out |= _numbers(f"stats/{metric}", stat)
    for model, means in (results.corruptions or {}).get("mean", {}).items():  # eval.corruptions
        out |= _numbers(f"corruptions/{model}", means)
    return out | _numbers("timings", results.timings)


def log_summary(logger: Logger | None, results: Results) -> None:
    """The run's final numbers (:func:`summary_scalars`) into its logger.

    W&B: the run summary, plus ``selected`` and ``mrc_source``, and the MRC table and interpolation curve as
    W&B Tables. CSV / TensorBoard: one more metrics row / set of scalars at the run's last step (None
    values left out).
    """
    if logger is None:
        return
    summary = summary_scalars(results)
    if not isinstance(logger, WandbLogger):
        step = logger.last_step if isinstance(logger, _LastStep) else None
        logger.log_metrics({k: v for k, v in summary.items() if v is not None}, step=step or 0)
        return
    import wandb

    run = logger.experiment
    run.summary.update(
        summary
        | {
            "selected": [s["name"] for s in results.selected],
            "mrc_source": results.mrc_source,
            "bn_stats": results.experiment.bn_stats,
            "data_fingerprint": results.data_fingerprint,
            "selection_held_out": results.selection_held_out,
        }
    )
    if results.mrc:
        cols = ["name", "type", "mrc", "status", "robust_acc_drop", "selected"]
        chosen = {s["name"] for s in results.selected}
        rows = [
            [
                r["name"],
                r["type"],
                r["mrc"],
                r.get("status", "exact"),  # lower_bound: mrc.exact_lowest stopped it early
                r.get("robust_acc_drop"),
                r["name"] in chosen,
            ]
            for r in results.mrc
        ]
        run.log({"mrc_table": wandb.Table(columns=cols, data=rows)})
    if results.interpolation:
        cols = ["alpha", "clean_acc", "robust_acc"]
        points = [[p[c] for c in cols] for p in results.interpolation]  # type: ignore[literal-required]
        run.log({"interpolation": wandb.Table(columns=cols, data=points)})
    if results.corruptions:  # one row per model, metric, corruption and severity
        c = results.corruptions
        rows = [
            [model, metric, name, int(severity), acc]
            for model in ("base", "final")
            for metric, table in c[model].items()  # type: ignore[literal-required]
            for name, by_severity in table.items()
            for severity, acc in by_severity.items()
        ]
        cols = ["model", "metric", "corruption", "severity", "accuracy"]
        run.log({"corruptions": wandb.Table(columns=cols, data=rows)})


def finish(logger: Logger | None) -> None:
    if isinstance(logger, WandbLogger) and logger._experiment is not None:
        logger.experiment.finish()
    elif logger is not None:
        logger.finalize("success")


class StageLoggers:
    """A job's experiment loggers, one per stage (``at``, ``finetune``), opened when first asked for."""

    def __init__(self, cfg: DictConfig, output_dir: Path) -> None:
        self.cfg, self.output_dir = cfg, output_dir
        self.open: dict[str, Logger | None] = {}

    def __call__(self, stage: str) -> Logger | None:
        """The stage's logger (opened now if it is not open)."""
        if stage not in self.open:
            self.open[stage] = make_logger(self.cfg, self.output_dir, stage)
        return self.open[stage]

    def close(self, stage: str, results: Results | None = None) -> None:
        """Write the run's summary (if given) into the stage's logger, opening one if needed, and close it."""
        if results is not None:
            log_summary(self(stage), results)
        finish(self.open.pop(stage, None))
