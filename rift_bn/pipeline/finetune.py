"""Stage 3, selective fine-tuning: the chosen modules of a copy of the base model, on clean data."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig
from torch import nn

from rift_bn.attacks import PGD
from rift_bn.callbacks import ModuleSelection
from rift_bn.modules import FineTuning
from rift_bn.pipeline.training import Timings, Training
from rift_bn.seeds import SeedStream


def finetune_milestones(epochs: int, milestones: list[int] | None) -> tuple[int, ...]:
    """Fine-tuning's lr decay epochs: as given, or half-way (RiFT: ``[epochs // 2]``) for null."""
    return tuple(milestones) if milestones is not None else (max(1, epochs // 2),)


def finetune(
    cfg: DictConfig,
    base: nn.Module,
    rows: list[dict] | None,
    num_classes: int,
    training: Training,
    work_dir: Path,
    logger: Any,
    timings: Timings,
) -> tuple[FineTuning, list[dict]]:
    """Fine-tune a copy of ``base``: the ``k`` lowest-MRC candidates of ``rows`` (RiFT, RiFT with BN), or
    every module of ``method.kinds`` without rows (the layer-type methods). Returns the module and the
    fine-tuned modules (name, type, mrc)."""
    f = cfg.finetune
    selection = ModuleSelection(
        tuple(cfg.method.kinds), cfg.k if rows is not None else None, rows, f.bn_stats
    )
    module = FineTuning(
        copy.deepcopy(base),
        PGD.from_config(cfg.attack),
        num_classes,
        lr=f.lr,
        momentum=f.momentum,
        weight_decay=f.weight_decay,
        milestones=finetune_milestones(f.epochs, f.milestones),
        gamma=f.gamma,
        channels_last=cfg.model.channels_last,
        eval_precision=cfg.eval.precision,
    )
    if cfg.model.compile:
        module.model.net.compile()
    with timings.timed("finetune"):
        L.seed_everything(SeedStream.JOB.of(cfg.seed), workers=True, verbose=False)
        training.fit("finetune", module, f.epochs, f.batch_size, work_dir, logger, [selection])
    return module, selection.selected
