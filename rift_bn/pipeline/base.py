"""Stage 1, the base model: the user's checkpoint, or the cached PGD-trained one, trained if missing."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from rift_bn import cache
from rift_bn.attacks import PGD
from rift_bn.errors import UserError
from rift_bn.loggers import StageLoggers
from rift_bn.models import ImageSpec, build_for
from rift_bn.models.checkpoint import CheckpointError, load_into, read_state_dict, save_state_dict
from rift_bn.modules import AdversarialTraining
from rift_bn.pipeline.training import Timings, Training, rank
from rift_bn.seeds import SeedStream


class MissingBaseModel(UserError):
    """No cached base model for these settings, and training one is switched off."""


@dataclass(frozen=True)
class Base:
    """The base model, its checkpoint, and the record of its training (empty for a given checkpoint)."""

    model: nn.Module
    path: Path
    info: dict[str, Any]


def new_model(mcfg: DictConfig, data: ImageSpec) -> nn.Module:
    """A freshly initialised network of the ``model`` group for data set ``data`` (from the global RNG)."""
    model = build_for(data, mcfg.name, mcfg.width)
    return model.to(memory_format=torch.channels_last) if mcfg.channels_last else model


def checkpoint_path(bcfg: DictConfig, cached: Path) -> Path:
    """The base checkpoint: ``base.checkpoint`` if given, else ``cached`` (this job's cache entry)."""
    return Path(str(bcfg.checkpoint)).expanduser().resolve() if bcfg.checkpoint is not None else cached


def base_model(
    cfg: DictConfig, path: Path, data: ImageSpec, training: Training, loggers: StageLoggers, timings: Timings
) -> Base:
    """The base model at ``path`` (see :func:`checkpoint_path`) on ``training.device``; a missing one is
    trained first (``base.train_if_missing``), once across the jobs sharing the cache."""
    if not path.exists():
        if not cfg.base.train_if_missing:
            raise MissingBaseModel(
                f"base.checkpoint=null: no cached base model at {path} and "
                "base.train_if_missing=false; train one with +experiment=at"
            )
        with cache.locked(path, enabled=rank() == 0):  # DDP ranks > 0 join rank 0's fit instead
            if not path.exists():
                train_base(cfg, path, data, training, loggers("at"), timings)
    return load_base(path, cfg.model, data, training.device)


def load_base(path: Path, mcfg: DictConfig, data: ImageSpec, device: torch.device) -> Base:
    """The base model of the ``model`` group for ``data`` saved at ``path``, on ``device``, with its training
    record."""
    model = new_model(mcfg, data)
    try:
        load_into(model, read_state_dict(path))
    except CheckpointError as e:
        msg = str(e)
        raise CheckpointError(
            msg if msg.startswith("base.checkpoint=") else f"base.checkpoint={path}: {msg}"
        ) from None
    info_path = path.with_suffix(".json")
    info = cache.read_json(info_path) if info_path.exists() else {}
    return Base(model.to(device), path, info)


def train_base(
    cfg: DictConfig, path: Path, data: ImageSpec, training: Training, logger: Any, timings: Timings
) -> None:
    """PGD adversarial training (``at``) of a new model; the most robust epoch on the selection split is
    saved at ``path``, its record beside it (``.json``). Resumes from ``<path>.work`` if interrupted."""
    work = path.with_suffix(".work")
    L.seed_everything(SeedStream.JOB.of(cfg.seed), workers=True, verbose=False)  # before the weights' init
    module = AdversarialTraining(
        new_model(cfg.model, data),
        PGD.from_config(cfg.at.attack, "at.attack", train_mode=cfg.at.attack_bn_mode == "train"),
        PGD.from_config(cfg.attack),
        data.num_classes,
        lr=cfg.at.lr,
        momentum=cfg.at.momentum,
        weight_decay=cfg.at.weight_decay,
        milestones=tuple(cfg.at.milestones),
        gamma=cfg.at.gamma,
        channels_last=cfg.model.channels_last,
        eval_precision=cfg.eval.precision,
    )
    if cfg.model.compile:
        module.model.net.compile()
    with timings.timed("adversarial_training"):
        training.fit("at", module, cfg.at.epochs, cfg.at.batch_size, work, logger)
    best = module.best_state or {k: v.cpu() for k, v in module.model.net.state_dict().items()}
    model = new_model(cfg.model, data)
    model.net.load_state_dict(best)
    info = {
        "best_epoch": module.best_epoch,
        "best_val_robust_acc": module.best_robust_acc,
        "history": module.history,
        "resumed": training.resumed.get("at"),
        "seconds": timings["adversarial_training"],
        "config": {
            k: OmegaConf.to_container(cfg[k], resolve=True, enum_to_str=True) for k in ("at", "data", "model")
        },
    }
    cache.write_json(path.with_suffix(".json"), info)
    save_state_dict(model, path)  # last: its existence marks the base model as complete
    shutil.rmtree(work, ignore_errors=True)
