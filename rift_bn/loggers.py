"""Experiment loggers (W&B offline by default, CSV, TensorBoard) and the end-of-run summary."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf


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
    """data, model, seed and stage tags; method and k for fine-tuning runs."""
    tags = [f"data:{cfg.data.name}", f"model:{cfg.model.name}", f"seed:{cfg.seed}", f"stage:{job_type}"]
    if job_type == "finetune":
        tags += [f"method:{cfg.method.name}", f"k:{cfg.k}" if cfg.method.selection == "mrc" else "k:all"]
    return tags + [str(t) for t in cfg.logger.get("tags") or []]


def make_logger(cfg: DictConfig, output_dir: Path, job_type: str) -> Logger | None:
    """The logger chosen by ``logger=``; W&B runs are grouped by sweep, typed by stage, tagged by setting."""
    name = cfg.logger.name
    if name == "none":
        return None
    if name == "csv":
        return CSVLogger(save_dir=str(output_dir), name=f"csv-{job_type}")
    if name == "tensorboard":
        return TensorBoardLogger(save_dir=str(output_dir), name=f"tb-{job_type}")
    mode = os.environ.get("WANDB_MODE") or cfg.logger.mode
    method = f"-{cfg.method.name}-k{cfg.k}" if cfg.stage == "finetune" and job_type != "at" else ""
    return WandbLogger(
        project=cfg.logger.project,
        entity=cfg.logger.get("entity"),
        save_dir=str(output_dir),
        name=f"{job_type}-{cfg.data.name}{method}-s{cfg.seed}",
        group=run_group(cfg, output_dir),
        job_type=job_type,
        tags=run_tags(cfg, job_type),
        offline=mode == "offline",
        mode=mode,
        config=OmegaConf.to_container(cfg, resolve=True),
        log_model=False,
    )


def log_summary(logger: Logger | None, results: dict[str, Any]) -> None:
    """Final numbers into the W&B summary, MRC table and interpolation curve as W&B Tables."""
    if not isinstance(logger, WandbLogger):
        return
    import wandb

    run = logger.experiment
    summary = {f"test/{k}": v for k, v in results["final"].items() if k != "checkpoint"}
    summary |= {f"base/{k}": v for k, v in results["base"].items() if k != "checkpoint"}
    summary |= {f"delta/{k}": v for k, v in (results.get("delta") or {}).items()}
    summary |= {
        "alpha": results.get("alpha"),
        "selected": [s["name"] for s in results.get("selected", [])],
        "mrc_source": results.get("mrc_source"),
    }
    run.summary.update(summary)
    if results.get("mrc"):
        cols = ["name", "type", "mrc", "robust_acc_drop", "selected"]
        chosen = {s["name"] for s in results.get("selected", [])}
        run.log(
            {
                "mrc_table": wandb.Table(
                    columns=cols,
                    data=[
                        [r["name"], r["type"], r["mrc"], r.get("robust_acc_drop"), r["name"] in chosen]
                        for r in results["mrc"]
                    ],
                )
            }
        )
    if results.get("interpolation"):
        cols = ["alpha", "clean_acc", "robust_acc"]
        run.log(
            {
                "interpolation": wandb.Table(
                    columns=cols, data=[[p[c] for c in cols] for p in results["interpolation"]]
                )
            }
        )


def finish(logger: Logger | None) -> None:
    if isinstance(logger, WandbLogger) and logger._experiment is not None:
        logger.experiment.finish()
    elif logger is not None:
        logger.finalize("success")
