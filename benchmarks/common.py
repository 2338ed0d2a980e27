"""What the benchmarks share: the pipeline's config, a trained base with its selection split, clocks."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from torch import nn

from rift_bn.config import validate
from rift_bn.data import CIFARDataModule
from rift_bn.pipeline.base import load_base
from rift_bn.schema import register

CONF = Path(__file__).resolve().parents[1] / "conf"


def job_config(overrides: Sequence[str] = (), values: Mapping[str, Any] | None = None) -> DictConfig:
    """The pipeline's config (``conf/``) for Hydra ``overrides``, then ``values`` (dotted key -> value, set
    as given: paths need no quoting), validated as the entry point validates it."""
    register()  # conf/ starts from the schema in Hydra's ConfigStore
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    for key, value in (values or {}).items():
        OmegaConf.update(cfg, key, value, merge=False)
    validate(cfg)
    return cfg


def trained_base(
    checkpoint: str | Path, cfg: DictConfig, device: torch.device
) -> tuple[nn.Module, CIFARDataModule]:
    """The base model saved at ``checkpoint`` (a ``state_dict`` of ``cfg``'s ``model``; eval mode, on
    ``device``) and ``cfg``'s data module (set up), built as the pipeline builds them."""
    dm = CIFARDataModule.from_config(cfg)
    dm.setup()
    return load_base(Path(checkpoint), cfg.model, dm.spec, device).model.eval(), dm


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> tuple[float, float]:
    """(wall, CPU) seconds after ``sync``; CPU is this process's time, robust to other jobs on the machine."""
    sync(device)
    return time.perf_counter(), time.process_time()
