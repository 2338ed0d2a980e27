"""Selective fine-tuning on clean data (the parameters left trainable by ModuleSelection)."""

from __future__ import annotations

from torch import Tensor, nn

from rift_bn.attacks import PGD
from rift_bn.modules.common import RobustClassifier


class FineTuning(RobustClassifier):
    """Clean cross-entropy; SGD with momentum over the trainable parameters only; lr x gamma at milestones."""

    acc_name = "clean_acc"  # logged as train/<acc_name>

    def __init__(
        self,
        model: nn.Module,
        eval_attack: PGD,
        num_classes: int,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        milestones: tuple[int, ...] = (5,),
        gamma: float = 0.1,
        channels_last: bool = False,
        eval_precision: str = "32-true",
    ) -> None:
        super().__init__(
            model,
            eval_attack,
            num_classes,
            channels_last,
            lr,
            momentum,
            weight_decay,
            milestones,
            gamma,
            eval_precision,
        )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return self.cross_entropy_step(x, y, batch_idx, "fine-tuning", "finetune.lr")
