"""Stages 4 and 5, evaluation: every model measured alike on the selection split (the base model, the
interpolation points) and on the test split (the report)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from rift_bn import cache
from rift_bn.attacks import PGD
from rift_bn.config import pixels
from rift_bn.evaluate import accuracies, per_image
from rift_bn.seeds import SeedStream, seeded


@dataclass(frozen=True)
class Evaluator:
    """Clean and PGD accuracy (percent) as the job measures every model: the ``attack`` group, in batches of
    ``eval.batch_size`` under ``eval.precision``, on ``device``. Each split has its seed stream (the same
    random starts for every model measured there); AutoAttack (``eval.autoattack``) is part of the test
    report only."""

    attack: PGD
    num_classes: int
    batch_size: int
    precision: str
    device: torch.device
    seed: int
    autoattack_eps: float | None = None

    @classmethod
    def from_config(cls, cfg: DictConfig, num_classes: int, device: torch.device) -> Evaluator:
        eps = pixels(cfg.attack.eps, "attack.eps") if cfg.eval.autoattack else None
        return cls(
            PGD.from_config(cfg.attack),
            num_classes,
            cfg.eval.batch_size,
            cfg.eval.precision,
            device,
            cfg.seed,
            eps,
        )

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, stream: SeedStream) -> dict[str, float]:
        """``model``'s accuracies (percent) on images ``x`` (uint8) with labels ``y``, on ``stream``
        (``SELECTION_EVAL`` or ``TEST_EVAL``)."""
        return accuracies(self.per_image(model, x, y, stream))

    def per_image(self, model: nn.Module, x: Tensor, y: Tensor, stream: SeedStream) -> dict[str, Tensor]:
        """Which images ``model`` gets right (``clean``, ``robust``, ``autoattack``), as ``__call__``."""
        with seeded(self.seed, stream):
            return per_image(
                model.to(self.device),
                x,
                y,
                self.attack,
                self.num_classes,
                self.batch_size,
                self.device,
                self.precision,
                autoattack_eps=self.autoattack_eps if stream is SeedStream.TEST_EVAL else None,
            )

    def test_report(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Any]:
        """The test split's accuracies and, under ``"per_image"``, the outcomes they count (plain lists,
        for the JSON cache)."""
        correct = self.per_image(model, x, y, SeedStream.TEST_EVAL)
        return accuracies(correct) | {"per_image": {k: v.tolist() for k, v in correct.items()}}


def cached_evaluation(path: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """An evaluation read from ``path``, or computed and written there once across processes."""
    return cache.cached(path, compute, cache.write_json, cache.read_json)[0]
