"""Entry point: ``python -m rift_bn.run [+experiment=at|topk|layer_types] [overrides] [-m]``.

Hydra glue around :func:`rift_bn.pipeline.run_job`: check the command line, compose, run one job per
config, print its results path or one ``error: ...`` line for a user's mistake (:class:`UserError`).

Under ``python -m`` this module is ``__main__``, so the joblib launcher pickles its functions by value
(cloudpickle): keep work in importable modules (``rift_bn.pipeline``) and only call it from here.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import rift_bn.schema  # noqa: F401  registers the config schema
from rift_bn.console import console_log, remove_unused_output
from rift_bn.errors import UserError
from rift_bn.pipeline import RESULTS, run_job


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
            run_job(cfg)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
        else:
            print(f"results: {output_dir.resolve() / RESULTS}", flush=True)
            return
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
