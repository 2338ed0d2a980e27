"""What every training stage shares: device-side input pipeline, SGD, clean + PGD validation, history."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from rift_bn.attacks import PGD
from rift_bn.data import augment, to_float
from rift_bn.data.cifar import PAD
from rift_bn.errors import NonFiniteLoss
from rift_bn.evaluate import autocast


def rng_states() -> dict[str, Any]:
    """Every global random stream (torch CPU and CUDA, numpy, Python) as tensors and plain values, so a
    checkpoint holding them still loads with ``torch.load(weights_only=True)``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(state), py_gauss],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` collected."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, py_gauss = states["python"]
    random.setstate((version, tuple(state), py_gauss))


def exact_percent(accuracy: MulticlassAccuracy) -> float:
    """A micro accuracy over all processes as the exact fraction of its counts (``compute()`` is float32)."""
    with accuracy.sync_context():
        correct, images = int(accuracy.tp.sum()), int(accuracy.tp.sum() + accuracy.fn.sum())
    return correct * 100 / images


class RobustClassifier(L.LightningModule):
    """A wrapped model whose validation reports clean and PGD accuracy (percent) once per epoch.

    Batches arrive as uint8; ``on_after_batch_transfer`` turns them into [0, 1] floats on the
    training device and augments training batches there (crop + flip, batched; :attr:`crop_pad`).
    Training is SGD with momentum over the trainable parameters, lr x ``gamma`` at each of ``milestones``
    (epochs).
    Validation runs in ``eval_precision`` ('32-true': float32 even under a bf16-mixed Trainer).
    """

    acc_name = "acc"  # logged as train/<acc_name>

    def __init__(
        self,
        model: nn.Module,
        eval_attack: PGD,
        num_classes: int,
        channels_last: bool = False,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        milestones: tuple[int, ...] = (),
        gamma: float = 0.1,
        eval_precision: str = "32-true",
    ) -> None:
        super().__init__()
        self.model = model
        self.eval_precision = eval_precision
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.milestones, self.gamma = list(milestones), gamma
        self.eval_attack = eval_attack
        self.channels_last = channels_last
        self.val_clean = MulticlassAccuracy(num_classes, average="micro")
        self.val_robust = MulticlassAccuracy(num_classes, average="micro")
        self.history: list[dict[str, float]] = []
        self._rng_to_restore: dict[str, Any] | None = None
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> tuple[Tensor, Tensor]:
        x, y = batch
        x = to_float(x)
        if self.trainer is not None and self.trainer.training:
            x = augment(x, pad=self.crop_pad)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    @property
    def crop_pad(self) -> int:
        """The random crop's padding: that of the data set being fitted (``CIFARDataModule.spec.pad``: 4
        for CIFAR, 8 for Tiny-ImageNet), CIFAR's without a data module."""
        spec = getattr(self.trainer.datamodule, "spec", None)
        return PAD if spec is None else spec.pad

    def cross_entropy_step(self, x: Tensor, y: Tensor, batch_idx: int, stage: str, setting: str) -> Tensor:
        """Mean cross-entropy on ``x``; logs ``train/loss`` and ``train/<acc_name>`` per epoch."""
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        self.check_finite(loss, batch_idx, stage, setting)
        acc = (logits.argmax(1) == y).float().mean() * 100
        self.log_dict({"train/loss": loss, f"train/{self.acc_name}": acc}, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=self.milestones, gamma=self.gamma)
        return [opt], [sched]

    def check_finite(self, loss: Tensor, batch_idx: int, stage: str, setting: str) -> None:
        """Stop on a NaN/Inf loss, naming the stage; on accelerators only every 25 steps (it syncs)."""
        if loss.device.type != "cpu" and batch_idx % 25:
            return
        if not torch.isfinite(loss):
            raise NonFiniteLoss(
                f"{stage}: loss is {loss.item()} at epoch {self.current_epoch}, batch {batch_idx}; "
                f"lower {setting}"
            )

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Clean and PGD accuracy in ``eval_precision`` (float32 by default, whatever the training's)."""
        x, y = batch
        with autocast(x.device, self.eval_precision):
            with torch.no_grad():
                self.val_clean.update(self.model(x), y)
            x_adv = self.eval_attack(self.model, x, y)
            with torch.no_grad():
                self.val_robust.update(self.model(x_adv), y)

    def on_validation_epoch_end(self) -> None:
        clean, robust = exact_percent(self.val_clean), exact_percent(self.val_robust)
        self.val_clean.reset()
        self.val_robust.reset()
        # "epoch" is 1-based (the console's "epoch k/N", results.json's history); the train rows of the
        # same epoch carry the same value (on_train_epoch_end), so Lightning's 0-based default never shows
        self.log_dict(
            {"val/clean_acc": clean, "val/robust_acc": robust, "epoch": float(self.current_epoch + 1)}
        )
        if not self.trainer.sanity_checking:
            self.history.append({"epoch": self.current_epoch + 1, "clean_acc": clean, "robust_acc": robust})
            if self.trainer.is_global_zero:
                print(
                    f"  {type(self).__name__} epoch {self.current_epoch + 1}/{self.trainer.max_epochs}: "
                    f"val clean {clean:.2f}%, robust {robust:.2f}%",
                    flush=True,
                )
            self.on_validation_result(clean, robust)

    def on_train_epoch_end(self) -> None:
        # logged before Lightning writes the epoch's train metrics, so its 0-based ``epoch`` is not added
        self.log("epoch", float(self.current_epoch + 1))

    def on_validation_result(self, clean_acc: float, robust_acc: float) -> None:
        """Hook for subclasses (the best-checkpoint tracking of adversarial training)."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """History and every random stream the run draws from (torch CPU and CUDA, numpy, Python): the
        augmentation and the attacks' random starts go on where they stood, so a resumed run equals an
        uninterrupted one (the data order is seeded by the epoch itself)."""
        checkpoint["history"] = list(self.history)
        checkpoint["rng"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = list(checkpoint.get("history", []))
        self._rng_to_restore = checkpoint.get("rng")

    def on_train_start(self) -> None:
        # after Lightning has restored the checkpoint and before the first batch of the resumed epoch
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None


def quiet_trainer(**overrides: Any) -> L.Trainer:
    """A Trainer for benchmarks and tests: CPU, no logger, checkpoints, progress bar, summary or sanity
    check, gradients enabled in validation (PGD needs them); ``overrides`` win."""
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "inference_mode": False,
    }
    return L.Trainer(**(settings | overrides))
