"""How a job trains a LightningModule: the Trainer of the ``trainer`` config group, resumed after an
interruption, relaunched under DDP; determinism for the whole job; seconds per stage."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, ListConfig, OmegaConf

from rift_bn.data import CIFARDataModule
from rift_bn.sync_bn import BatchNormSync

DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
# Keys of the trainer group that are our names for Trainer arguments; every other key is passed as it is.
TRAINER_NAMES = {"progress_bar": "enable_progress_bar"}
# What every fit of the pipeline sets, whatever the trainer group says.
TRAINER_FIXED: dict[str, Any] = {
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "inference_mode": False,  # validation runs PGD, which needs gradients
}


def rank() -> int:
    """This process's global rank (0 without DDP)."""
    return int(rank_zero_only.rank)


def deterministic_mode(setting: bool | str) -> None:
    """``trainer.deterministic`` for the whole job, not only inside Lightning's Trainer: the adversarial
    sets, MRC and evaluation run outside it (on GPU, cuDNN's default kernels make MRC differ run to run).
    ``true`` raises on an op without a deterministic kernel, ``"warn"`` warns."""
    if setting in (False, None):
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it before its first use
    torch.use_deterministic_algorithms(True, warn_only=setting == "warn")
    torch.backends.cudnn.benchmark = False


@contextmanager
def ddp_relaunch(trainer: L.Trainer, output_dir: Path) -> Iterator[None]:
    """Let Lightning's DDP launcher re-run exactly this job in its worker processes, then tidy up.

    Lightning starts ranks > 0 as ``python -m rift_bn.run <sys.argv[1:]> hydra.run.dir=<run dir>``. Inside a
    multirun that would be the whole sweep (``-m k=1,2``) in the wrong folder, so the command line becomes
    this job's own overrides and the run dir this job's folder. Afterwards rank 0 forgets the DDP
    environment, so a later fit in the same process (the next stage, the next sweep job) launches afresh.
    """
    if not (trainer.world_size > 1 and rank() == 0 and "LOCAL_RANK" not in os.environ):
        yield
        return
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    argv, env = list(sys.argv), {k: os.environ.get(k) for k in DDP_ENV}
    hc = HydraConfig.get()
    run_dir = hc.run.dir
    sys.argv = [argv[0], *hc.overrides.task]
    with read_write(hc), open_dict(hc):
        hc.run.dir = str(output_dir)
    try:
        yield
    finally:
        sys.argv = argv
        with read_write(hc), open_dict(hc):
            hc.run.dir = run_dir
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Timings(dict[str, float]):
    """Seconds per stage; a stage timed again adds to its seconds."""

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[stage] = self.get(stage, 0.0) + time.perf_counter() - t0


@dataclass
class Training:
    """The job's fits: the ``trainer`` group (``tcfg``) on ``dm``, pinned to ``gpu`` under the parallel
    launcher, checkpointed each epoch into a work folder it resumes from (``resumed``: per stage, None or
    where it resumed)."""

    tcfg: DictConfig
    dm: CIFARDataModule
    output_dir: Path
    device: torch.device
    gpu: int | None = None  # the GPU this job is pinned to (hydra/launcher=parallel)
    resumed: dict[str, dict[str, Any] | None] = field(default_factory=dict)

    @property
    def processes(self) -> int:
        """Training processes (DDP world size) the trainer group starts; 1 for a job pinned to one GPU."""
        devices = self.tcfg.devices
        if self.gpu is not None:
            count = 1
        elif isinstance(devices, ListConfig | list):
            count = len(devices)
        elif devices in ("auto", -1):  # Lightning: every GPU, one CPU process
            count = torch.cuda.device_count() if self.device.type == "cuda" else 1
        elif isinstance(devices, str):
            count = len([d for d in devices.split(",") if d.strip()])
        else:
            count = int(devices)
        return max(1, count) * int(self.tcfg.num_nodes)

    def trainer(
        self, max_epochs: int, work_dir: Path, logger: Any, callbacks: Sequence[Callback]
    ) -> L.Trainer:
        """The trainer group's Trainer (our names renamed), keeping the last epoch in ``work_dir``."""
        group = OmegaConf.to_container(self.tcfg, resolve=True)
        kwargs = {TRAINER_NAMES.get(str(k), str(k)): v for k, v in group.items()}  # type: ignore[union-attr]
        if self.gpu is not None:
            kwargs["devices"] = [self.gpu]
        last = ModelCheckpoint(
            dirpath=str(work_dir),
            filename="last",
            save_last=False,
            save_top_k=1,
            every_n_epochs=1,
            enable_version_counter=False,
        )
        return L.Trainer(
            **kwargs,
            **TRAINER_FIXED,
            max_epochs=max_epochs,
            logger=logger if logger is not None else False,
            callbacks=[*callbacks, last],
            default_root_dir=str(self.output_dir),
            plugins=[BatchNormSync()],  # DDP: BN statistics of the whole step (sync_batchnorm, CPU too)
        )

    def fit(
        self,
        stage: str,
        module: L.LightningModule,
        max_epochs: int,
        batch_size: int,
        work_dir: Path,
        logger: Any,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        """Fit ``module`` for ``max_epochs`` on batches of ``batch_size``, resuming from
        ``work_dir/last.ckpt`` after an interruption; DDP ranks > 0 end here."""
        self.dm.batch_size = batch_size
        trainer = self.trainer(max_epochs, work_dir, logger, callbacks)
        last = work_dir / "last.ckpt"
        self.resumed[stage] = None
        if last.exists():
            done = len(torch.load(last, map_location="cpu", weights_only=True).get("history", []))
            self.resumed[stage] = {"after_epoch": done, "checkpoint": str(last)}
            if rank() == 0:
                print(f"resuming from {last} (after epoch {done})", flush=True)
        with ddp_relaunch(trainer, self.output_dir):
            trainer.fit(
                module, datamodule=self.dm, ckpt_path=str(last) if last.exists() else None, weights_only=True
            )
        if trainer.world_size > 1:
            if not trainer.is_global_zero:
                sys.exit(0)  # rank 0 alone goes on to the single-process stages
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        module.to(self.device)
