"""Entry point: ``python -m rift_bn.run [+experiment=at|topk|layer_types] [overrides] [-m]``.

One job: (train or load) the adversarially trained base model; for ``stage=finetune`` compute or load
the MRC table, fine-tune the selected modules on clean data, interpolate towards the base model on the
selection split; finally evaluate on the test set and write ``results.json`` beside Hydra's output.

Under ``python -m`` this module is ``__main__``, so the joblib launcher pickles its functions by value
(cloudpickle): keep work in importable modules (``rift_bn.pipeline``) and only call it from here.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from rift_bn import cache
from rift_bn.config import NON_RESULT_KEYS, ConfigError, validate
from rift_bn.console import console_log, remove_unused_output
from rift_bn.data import CIFARDataModule, DataError
from rift_bn.interpolate import interpolate_state
from rift_bn.models import candidate_modules
from rift_bn.models.checkpoint import CheckpointError, file_sha256, save_state_dict
from rift_bn.pipeline import Run, deterministic_mode
from rift_bn.report.summary import format_summary

USER_ERRORS = (ConfigError, DataError, CheckpointError, FileNotFoundError, FloatingPointError)


def job_key(cfg: DictConfig, data_fingerprint: str) -> str:
    """Identity of a job's results: the resolved config without the settings that change no number,
    and the fingerprint of the images and labels the job loaded (another copy at the same path, a subset
    or one changed file gives another key)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["data_fingerprint"] = data_fingerprint
    for dotted in NON_RESULT_KEYS:
        *parents, leaf = dotted.split(".")
        node = plain
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return cache.digest(plain, 24)


def pick_device(cfg: DictConfig) -> tuple[torch.device, int | None]:
    """The device of the single-process stages, and the GPU the parallel launcher pins this job to."""
    if cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        hc = HydraConfig.get()
        if "Joblib" in str(hc.launcher.get("_target_", "")):  # hydra/launcher=parallel: one job per GPU
            gpu = hc.job.num % torch.cuda.device_count()
            torch.cuda.set_device(gpu)
            return torch.device("cuda", gpu), gpu
        return torch.device("cuda", torch.cuda.current_device()), None
    return torch.device("cpu"), None


def is_complete(results: dict) -> bool:
    return all(k in results for k in ("stage", "base", "final", "delta", "timings", "config"))


def execute(cfg: DictConfig) -> Path:
    """Run one job and return the path of its results.json."""
    validate(cfg)
    deterministic_mode(cfg.trainer.deterministic)
    output_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    results_path = output_dir / "results.json"
    cache_dir = Path(cfg.cache_dir).expanduser().resolve()
    dm = CIFARDataModule(
        cfg.data.name,
        cfg.data.root,
        cfg.data.val_size,
        cfg.data.train_subset,
        cfg.data.test_subset,
        batch_size=cfg.at.batch_size,
        eval_batch_size=cfg.eval.batch_size,
        seed=cfg.seed,
        download=cfg.data.download,
        selection_source=cfg.data.selection_source,
    )
    dm.setup()
    key = job_key(cfg, dm.fingerprint)
    state_dir = cache_dir / "runs" / key
    done = state_dir / "results.json"
    if done.exists() and is_complete(finished := cache.read_json(done)) and not cfg.force:
        cache.write_json(results_path, finished)
        print(f"complete already (force=true recomputes): {done}")
        print(format_summary(finished), flush=True)  # the same numbers as when it was computed
        return results_path
    # force=true: the finished result (if any) is not reused, and stays until the new one replaces it.
    # Training state in state_dir belongs to an unfinished attempt (a finished job removes its own), so
    # a forced job that was interrupted resumes its own progress like any other.

    if cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={cfg.trainer.accelerator}: no CUDA GPU is visible here; "
            "use trainer=cpu (or trainer.accelerator=auto)"
        )
    device, gpu = pick_device(cfg)
    run = Run(cfg, output_dir, device, dm, cache_dir, gpu=gpu)
    if cfg.stage == "finetune" and cfg.method.selection == "mrc":
        n = len(candidate_modules(run.new_model(), set(cfg.method.kinds)))
        if cfg.k > n:
            raise ConfigError(
                f"k={cfg.k}: {cfg.model.name} has only {n} {cfg.method.name} candidates "
                f"({'+'.join(cfg.method.kinds)}); choose k between 1 and {n}"
            )
    base, base_path, base_info = run.base_model()
    held_out = cfg.base.checkpoint is None or cfg.data.selection_source == "test_half"
    if not held_out and rank_zero_only.rank == 0:
        print(
            f"warning: base.checkpoint={cfg.base.checkpoint}: a published checkpoint was trained on every "
            "training image, so the selection split is its training data; "
            "data.selection_source=test_half selects on half of the test set",
            flush=True,
        )
    ckpt_hash = file_sha256(base_path)
    results: dict = {
        "stage": cfg.stage,
        "dataset": cfg.data.name,
        "model": cfg.model.name,
        "width": cfg.model.width,
        "method": None,
        "k": None,
        "bn_stats": None,
        "seed": cfg.seed,
        "data_fingerprint": dm.fingerprint,
        "selection_source": cfg.data.selection_source,
        "selection_held_out": held_out,
        "selection_size": len(dm.val_y),
        "test_size": dm.test_size,
        "selected": [],
        "mrc": [],
        "mrc_source": None,
        "alpha": None,
        "interpolation": [],
        "history": [],
        "base_training": base_info,
    }
    final, final_ckpt = base, base_path
    if cfg.stage == "finetune":
        run.close_logger("at")
        rows, source = None, None
        if cfg.method.selection == "mrc":
            rows, source = run.mrc_table(base, ckpt_hash, tuple(cfg.method.kinds))
        base_val = run.base_val(base, ckpt_hash)
        module, selected = run.finetune(base, rows, state_dir)
        tuned = module.model.eval()
        curve, best = run.interpolate(base, tuned, base_val)
        final = copy.deepcopy(base)
        final.load_state_dict(interpolate_state(base.state_dict(), tuned.state_dict(), best["alpha"]))
        final_ckpt = output_dir / "final.pt"
        save_state_dict(final, final_ckpt)
        save_state_dict(tuned, output_dir / "finetuned.pt")  # alpha = 1: the fine-tuned model itself
        results |= {
            "method": cfg.method.name,
            "k": cfg.k if cfg.method.selection == "mrc" else None,
            "bn_stats": cfg.finetune.bn_stats,
            "finetuned_checkpoint": str(output_dir / "finetuned.pt"),
            "selected": selected,
            "mrc": rows or [],
            "mrc_source": source,
            "alpha": best["alpha"],
            "interpolation": curve,
            "history": [{"epoch": 0, **base_val}, *module.history],
            "selection_split": {"base": base_val, "final": best},
        }
    test_reads_before_report = dm.test_accesses
    if test_reads_before_report:  # not an assert: the guard must hold under python -O too
        raise RuntimeError("the test split was read before the final report; nothing selected may see it")
    with run.timed("test_eval"):
        base_test = run.base_test(base, ckpt_hash)
        final_test = (
            base_test
            if final is base
            else run.evaluate(final, *dm.test_tensors(), cfg.seed + 4, cfg.eval.autoattack)
        )
    results |= {
        "base": {**base_test, "checkpoint": str(base_path)},
        "final": {**final_test, "checkpoint": str(final_ckpt)},
        "delta": {k: final_test[k] - base_test[k] for k in base_test},
        "test_split_reads_before_report": test_reads_before_report,
        "resumed": run.resumed,  # per stage trained in this job: null, or the epoch it resumed after
        "timings": run.timings,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "job_key": key,
    }
    cache.write_json(results_path, results)
    cache.write_json(done, results)
    for entry in state_dir.iterdir():  # the attempt is finished: its training state goes
        if entry.is_dir():
            shutil.rmtree(entry)
        elif entry != done:
            entry.unlink()
    run.close_logger(cfg.stage, results)
    print(format_summary(results))
    return results_path


def quiet() -> None:
    """Silence warnings a user cannot act on. Called at import and again by each job: the joblib launcher
    runs main() in worker processes that never execute this module's top level."""
    # Our submitit_* launcher files set resource defaults on top of the plugin's schema of the same name.
    warnings.filterwarnings(
        "ignore", message=r"(?s).*is validated against ConfigStore schema with the same name"
    )
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r".*overridden `on_after_batch_transfer`")
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval")
    # resuming writes into the run's own checkpoint folder, which holds the last epoch by design
    warnings.filterwarnings("ignore", message=r"(?s)Checkpoint directory .* exists and is not empty")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)


quiet()
OmegaConf.register_new_resolver("visible_gpus", lambda: max(1, torch.cuda.device_count()), replace=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    quiet()
    hc = HydraConfig.get()
    output_dir = Path(hc.runtime.output_dir)
    with console_log(output_dir):  # the job's console, also in <output dir>/run.log
        try:
            path = execute(cfg)
        except USER_ERRORS as e:
            error = str(e)
        except ValueError as e:  # validation inside the library (k, attack, names) speaks in settings too
            if "=" not in str(e).split(":")[0]:
                raise
            error = str(e)
        else:
            print(f"results: {path}", flush=True)
            return
        print(f"error: {error}", file=sys.stderr, flush=True)
    # refused before any work: leave no folder without results behind (the report would list it missing)
    remove_unused_output(output_dir, single_launcher="BasicLauncher" in str(hc.launcher.get("_target_", "")))
    sys.exit(2)


def cli() -> None:
    """Check the command line (one-line errors, nothing run), then hand it to Hydra."""
    os.environ.setdefault("WANDB_SILENT", "true")
    if "LOCAL_RANK" not in os.environ:  # DDP workers re-run a command rank 0 has checked already
        from rift_bn.precheck import precheck

        problem = precheck(sys.argv[1:])
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
