"""PGD adversarial training (Madry et al.) of the base model, keeping the most robust epoch."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from rift_bn.attacks import PGD
from rift_bn.modules.common import RobustClassifier


class AdversarialTraining(RobustClassifier):
    """Train on PGD examples of ``train_attack`` (its ``train_mode``: crafted in train mode as Bag-of-Tricks
    does, or in eval mode); remember the weights with the best validation robust accuracy."""

    acc_name = "robust_acc"  # logged as train/<acc_name>

    def __init__(
        self,
        model: nn.Module,
        train_attack: PGD,
        eval_attack: PGD,
        num_classes: int,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        milestones: tuple[int, ...] = (100, 105),
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
        self.train_attack = train_attack
        self.best_robust_acc = -1.0
        self.best_epoch = 0
        self.best_state: dict[str, Tensor] | None = None

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return self.cross_entropy_step(
            self.train_attack(self.model, x, y), y, batch_idx, "adversarial training", "at.lr"
        )

    def on_validation_result(self, clean_acc: float, robust_acc: float) -> None:
        if robust_acc > self.best_robust_acc:
            self.best_robust_acc, self.best_epoch = robust_acc, self.current_epoch + 1
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.net.state_dict().items()}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["best"] = {
            "robust_acc": self.best_robust_acc,
            "epoch": self.best_epoch,
            "state": self.best_state,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        best = checkpoint.get("best", {})
        self.best_robust_acc = best.get("robust_acc", -1.0)
        self.best_epoch = best.get("epoch", 0)
        self.best_state = best.get("state")
