"""Which modules fine-tuning may change, and which BatchNorm layers update their running statistics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch import nn

from rift_bn.config import ConfigError
from rift_bn.models import candidate_modules
from rift_bn.mrc import select_lowest
from rift_bn.schema import BNStats

BN_STATS = tuple(BNStats)


def freeze_except(model: nn.Module, selected: Sequence[str]) -> None:
    """requires_grad only for parameters of the modules named in ``selected`` (inside ``model.net``)."""
    chosen = set(selected)
    for name, module in model.net.named_modules():
        for p in module.parameters(recurse=False):
            p.requires_grad_(name in chosen)


def set_bn_modes(model: nn.Module, selected: Sequence[str], bn_stats: str) -> None:
    """Train mode for BN layers whose statistics should adapt, eval mode for the others."""
    chosen = set(selected)
    for name, module in model.net.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train(bn_stats == "all" or (bn_stats == "selected" and name in chosen))


class ModuleSelection(Callback):
    """Chooses the modules to fine-tune before the optimiser is built and keeps BN modes for the whole fit.

    ``mrc_rows`` given: the ``k`` lowest-MRC candidates of ``kinds`` (RiFT / RiFT with BN). Otherwise every
    module of ``kinds`` (the layer-type methods ``full``, ``bn_only``, ``conv_linear_only``). Rank 0's
    choice is broadcast so every DDP rank trains the same modules.
    """

    def __init__(
        self,
        kinds: Sequence[str],
        k: int | None = None,
        mrc_rows: Sequence[dict] | None = None,
        bn_stats: str = "selected",
    ) -> None:
        if bn_stats not in BN_STATS:
            raise ConfigError(f"finetune.bn_stats={bn_stats}: choose one of {', '.join(BN_STATS)}")
        self.kinds, self.k, self.mrc_rows, self.bn_stats = tuple(kinds), k, mrc_rows, bn_stats
        self.selected: list[dict[str, Any]] = []

    def choose(self, model: nn.Module) -> list[dict[str, Any]]:
        if self.mrc_rows is not None:
            return [
                {"name": r["name"], "type": r["type"], "mrc": r["mrc"]}
                for r in select_lowest(self.mrc_rows, self.kinds, self.k or 1)
            ]
        return [{"name": n, "type": t, "mrc": None} for n, _, t in candidate_modules(model, set(self.kinds))]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.selected = trainer.strategy.broadcast(self.choose(pl_module.model), src=0)
        freeze_except(pl_module.model, [s["name"] for s in self.selected])

    def _apply_bn_modes(self, pl_module: L.LightningModule) -> None:
        set_bn_modes(pl_module.model, [s["name"] for s in self.selected], self.bn_stats)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply_bn_modes(pl_module)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._apply_bn_modes(pl_module)  # Lightning calls model.train() around validation; re-assert
