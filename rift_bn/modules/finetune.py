"""Selective fine-tuning on clean data (the parameters left trainable by ModuleSelection)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rift_bn.attacks import PGD
from rift_bn.modules.common import RobustClassifier


class FineTuning(RobustClassifier):
    """Clean cross-entropy; SGD with momentum over the trainable parameters only; lr x gamma at milestones."""

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
    ) -> None:
        super().__init__(model, eval_attack, num_classes, channels_last)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.milestones, self.gamma = list(milestones), gamma

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        self.check_finite(loss, batch_idx, "fine-tuning", "finetune.lr")
        acc = (logits.argmax(1) == y).float().mean() * 100
        self.log_dict({"train/loss": loss, "train/clean_acc": acc}, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=self.milestones, gamma=self.gamma)
        return [opt], [sched]
