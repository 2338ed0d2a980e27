"""One job, start to end: ``run_job(cfg) -> Results``, what ``python -m rift_bn.run`` runs per job.

(Train or load) the base model; for ``stage=finetune`` the MRC table, fine-tuning of the selected modules
on clean data and the interpolation towards the base model on the selection split; finally the test
report, written once as ``results.json`` beside Hydra's output and in the cache's ``runs/<job key>/``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import nn

from rift_bn.config import ConfigError, validate
from rift_bn.data import CIFARDataModule
from rift_bn.errors import UserError
from rift_bn.interpolate import choose_alpha, interpolated, interpolation_curve
from rift_bn.loggers import StageLoggers
from rift_bn.models import ImageSpec, candidate_modules
from rift_bn.models.checkpoint import file_sha256, save_state_dict
from rift_bn.pipeline.base import Base, base_model, checkpoint_path, new_model
from rift_bn.pipeline.corruption_eval import report_corruptions
from rift_bn.pipeline.evaluation import Evaluator, cached_evaluation
from rift_bn.pipeline.finetune import finetune
from rift_bn.pipeline.keys import CacheKeys, job_key
from rift_bn.pipeline.mrc_table import job_mrc_table
from rift_bn.pipeline.training import Timings, Training, deterministic_mode, rank
from rift_bn.report.bn_outputs import BN_OUTPUTS, save_job_bn_outputs
from rift_bn.report.summary import format_summary
from rift_bn.results import (
    OUTCOMES,
    Experiment,
    Results,
    load,
    outcome_stats,
    read_outcomes,
    write_outcomes,
)
from rift_bn.seeds import SeedStream

RESULTS = "results.json"
KEPT = {RESULTS, OUTCOMES, BN_OUTPUTS}  # what the cache's runs/<job key>/ keeps of a finished job


@dataclass(frozen=True)
class HydraJob:
    """What a job takes from Hydra: its output folder, ``+experiment=<name>``, and its number under the
    parallel launcher (one job per GPU), else None."""

    output_dir: Path
    experiment: str | None
    parallel_number: int | None

    @classmethod
    def current(cls) -> HydraJob:
        hc = HydraConfig.get()
        parallel = "Joblib" in str(hc.launcher.get("_target_", ""))  # hydra/launcher=parallel
        return cls(
            Path(hc.runtime.output_dir).resolve(),
            hc.runtime.choices.get("experiment"),
            int(hc.job.num) if parallel else None,
        )


@dataclass(frozen=True)
class Job:
    """What the steps of one job share."""

    cfg: DictConfig
    dm: CIFARDataModule
    output_dir: Path
    state_dir: Path  # the cache's runs/<job key>/: training state, then the finished record
    keys: CacheKeys
    training: Training
    loggers: StageLoggers
    timings: Timings
    evaluate: Evaluator


def pick_device(accelerator: str, parallel_number: int | None) -> tuple[torch.device, int | None]:
    """The device of the single-process stages, and the GPU the parallel launcher pins this job to."""
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator}: no CUDA GPU is visible here; "
            "use trainer=cpu (or trainer.accelerator=auto)"
        )
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        if parallel_number is not None:
            gpu = parallel_number % torch.cuda.device_count()
            torch.cuda.set_device(gpu)
            return torch.device("cuda", gpu), gpu
        return torch.device("cuda", torch.cuda.current_device()), None
    return torch.device("cpu"), None


def check_k(cfg: DictConfig, data: ImageSpec) -> None:
    """``k`` must not exceed the method's candidates (the network's modules of ``method.kinds``)."""
    if cfg.stage != "finetune" or cfg.method.selection != "mrc":
        return
    kinds = tuple(cfg.method.kinds)
    n = len(candidate_modules(new_model(cfg.model, data), set(kinds)))
    if cfg.k > n:
        raise ConfigError(
            f"k={cfg.k}: {cfg.model.name} has only {n} {cfg.method.name} candidates "
            f"({'+'.join(kinds)}); choose k between 1 and {n}"
        )


def finished(path: Path) -> Results | None:
    """The record of a job finished earlier, or None (none, or one this version cannot read)."""
    try:
        return load(path) if path.exists() else None
    except UserError:
        return None


def run_job(cfg: DictConfig) -> Results:
    """Run one job (see the module docstring) and return its record. A job finished before is not run
    again: its record is copied (``force=true`` recomputes)."""
    validate(cfg)
    deterministic_mode(cfg.trainer.deterministic)
    hydra = HydraJob.current()
    dm = CIFARDataModule.from_config(cfg)
    dm.setup()
    cache_dir = Path(cfg.cache_dir).expanduser().resolve()
    state_dir = cache_dir / "runs" / job_key(cfg, dm.fingerprint)
    done = None if cfg.force else finished(state_dir / RESULTS)
    if done is not None:
        for name in KEPT - {RESULTS}:  # the finished run's files beside its record
            if (state_dir / name).exists():
                shutil.copyfile(state_dir / name, hydra.output_dir / name)
        done.write(hydra.output_dir / RESULTS)
        print(f"complete already (force=true recomputes): {state_dir / RESULTS}")
        print(format_summary(done), flush=True)  # the same numbers as when it was computed
        return done
    # force=true: the finished result (if any) is not reused, and stays until the new one replaces it.
    # Training state in state_dir belongs to an unfinished attempt (a finished job removes its own), so
    # a forced job that was interrupted resumes its own progress like any other.
    device, gpu = pick_device(cfg.trainer.accelerator, hydra.parallel_number)
    check_k(cfg, dm.spec)
    training = Training(cfg.trainer, dm, hydra.output_dir, device, gpu)
    job = Job(
        cfg,
        dm,
        hydra.output_dir,
        state_dir,
        keys=CacheKeys(cfg, dm.fingerprint, cache_dir, device.type, training.processes),
        training=training,
        loggers=StageLoggers(cfg, hydra.output_dir),
        timings=Timings(),
        evaluate=Evaluator.from_config(cfg, dm.num_classes, device),
    )
    path = checkpoint_path(cfg.base, job.keys.base_path())
    base = base_model(cfg, path, dm.spec, training, job.loggers, job.timings)
    fields = {"selection_held_out": held_out(cfg), "base_training": base.info}
    ckpt_hash = file_sha256(base.path)
    final, final_path = base.model, base.path
    if cfg.stage == "finetune":
        job.loggers.close("at")
        final, final_path, tuned_fields = selective_finetuning(job, base.model, ckpt_hash)
        fields |= tuned_fields
        fields |= save_job_bn_outputs(job, base.model, final, ckpt_hash, tuned_fields["finetuned_checkpoint"])
    fields |= report_test_split(job, base, ckpt_hash, final, final_path)
    # eval.corruptions: after the test report, with the final model fixed (nothing is chosen on them)
    fields |= report_corruptions(cfg, job.keys, base.model, ckpt_hash, final, device, job.timings)
    results = record(job, hydra.experiment, fields)
    results.write(hydra.output_dir / RESULTS)
    results.write(state_dir / RESULTS)
    for entry in state_dir.iterdir():  # the attempt is finished: its training state goes
        if entry.is_dir():
            shutil.rmtree(entry)
        elif entry.name not in KEPT:
            entry.unlink()
    job.loggers.close(cfg.stage, results)
    print(format_summary(results))
    return results


def held_out(cfg: DictConfig) -> bool:
    """Whether the selection split is unseen by the base model; warns when it may not be."""
    if cfg.base.checkpoint is None or cfg.data.selection_source == "test_half":
        return True
    if rank() == 0:
        print(
            f"warning: base.checkpoint={cfg.base.checkpoint}: a published checkpoint was trained on every "
            "training image, so the selection split is its training data; "
            "data.selection_source=test_half selects on half of the test set",
            flush=True,
        )
    return False


def selective_finetuning(job: Job, base: nn.Module, ckpt_hash: str) -> tuple[nn.Module, Path, dict[str, Any]]:
    """MRC (``method.selection=mrc``), fine-tuning, interpolation and alpha* on the selection split.
    Returns theta(alpha*), its checkpoint, and the record's fields of these stages."""
    cfg, dm, timings = job.cfg, job.dm, job.timings
    rows, source = None, None
    if cfg.method.selection == "mrc":
        kinds, selection, device = tuple(cfg.method.kinds), (dm.val_x, dm.val_y), job.training.device
        rows, source = job_mrc_table(
            cfg, kinds, base, ckpt_hash, selection, job.keys, device, timings, lock=rank() == 0
        )
    with timings.timed("base_eval"):
        base_val = cached_evaluation(
            job.keys.eval_path(ckpt_hash, "val"),
            lambda: job.evaluate(base, dm.val_x, dm.val_y, SeedStream.SELECTION_EVAL),
        )
    logger = job.loggers("finetune")
    module, selected = finetune(cfg, base, rows, dm.num_classes, job.training, job.state_dir, logger, timings)
    tuned = module.model.eval()
    with timings.timed("interpolation"):
        curve = interpolation_curve(
            base,
            tuned,
            cfg.interpolation.alphas,
            base_val,
            lambda model: job.evaluate(model, dm.val_x, dm.val_y, SeedStream.SELECTION_EVAL),
        )
    best = choose_alpha(curve, base_val["robust_acc"], cfg.interpolation.tolerance)
    final = interpolated(base, tuned, best["alpha"])
    final_path, tuned_path = job.output_dir / "final.pt", job.output_dir / "finetuned.pt"
    save_state_dict(final, final_path)
    save_state_dict(tuned, tuned_path)  # alpha = 1: the fine-tuned model itself
    return (
        final,
        final_path,
        {
            "finetuned_checkpoint": str(tuned_path),
            "selected": selected,
            "mrc": rows or [],
            "mrc_source": source,
            "alpha": best["alpha"],
            "interpolation": curve,
            "history": [{"epoch": 0, **base_val}, *module.history],
            "selection_split": {"base": base_val, "final": best},
        },
    )


def report_test_split(
    job: Job, base: Base, ckpt_hash: str, final: nn.Module, final_path: Path
) -> dict[str, Any]:
    """Test accuracy of the base and the final model: the record's first and only read of the test split."""
    reads_before = job.dm.test_accesses
    if reads_before:  # not an assert: the guard must hold under python -O too
        raise RuntimeError("the test split was read before the final report; nothing selected may see it")
    with job.timings.timed("test_eval"):
        with job.timings.timed("base_eval"):
            base_test = cached_evaluation(
                job.keys.eval_path(ckpt_hash, "test"),
                lambda: job.evaluate.test_report(base.model, *job.dm.test_tensors()),
            )
        final_test = (
            base_test if final is base.model else job.evaluate.test_report(final, *job.dm.test_tensors())
        )
    base_test, final_test = dict(base_test), dict(final_test)  # the same dict for stage=at
    base_correct, final_correct = base_test.pop("per_image"), final_test.pop("per_image")
    outcomes = job.output_dir / OUTCOMES
    write_outcomes(outcomes, job.dm.test_index.numpy(), base_correct, final_correct)
    job.state_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(outcomes, job.state_dir / OUTCOMES)  # kept with the finished record
    return {
        "base": {**base_test, "checkpoint": str(base.path)},
        "final": {**final_test, "checkpoint": str(final_path)},
        "delta": {k: final_test[k] - base_test[k] for k in base_test},
        "test_split_reads_before_report": reads_before,
        "outcomes": OUTCOMES,
        "stats": outcome_stats(read_outcomes(outcomes)),
    }


def record(job: Job, experiment: str | None, fields: dict[str, Any]) -> Results:
    """The job's record from the stages' ``fields``, as it is written (plain data, for loggers too)."""
    config: dict[str, Any] = OmegaConf.to_container(job.cfg, resolve=True, enum_to_str=True)  # type: ignore[assignment]
    return Results(
        experiment=Experiment.of_run(config, experiment),
        data_fingerprint=job.dm.fingerprint,
        selection_source=config["data"]["selection_source"],
        selection_size=len(job.dm.val_y),
        test_size=job.dm.test_size,
        resumed=job.training.resumed,  # per stage trained in this job: null, or the epoch it resumed after
        timings=dict(job.timings),
        config=config,
        job_key=job.state_dir.name,
        **fields,
    ).as_written()
