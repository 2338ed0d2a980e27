"""Clean and robust accuracy of a model on in-memory uint8 images (torchmetrics)."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from rift_bn.attacks import PGD, autoattack
from rift_bn.data import to_float


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for a Lightning precision string ('32-true', 'bf16-mixed', '16-mixed').

    '32-true' switches autocast off, so float32 evaluation stays float32 even inside a bf16 Trainer."""
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: PGD | None,
    num_classes: int,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    precision: str = "32-true",
    autoattack_eps: float | None = None,
) -> dict[str, float]:
    """Clean accuracy and accuracy under ``attack`` (and AutoAttack if ``autoattack_eps``), in percent."""
    device = torch.device(device)
    modes = [(m, m.training) for m in model.modules()]  # per module: a mixed state comes back as it was
    model.eval()
    metrics = {
        name: MulticlassAccuracy(num_classes, average="micro").to(device)
        for name in ("clean_acc", "robust_acc", "autoattack_acc")
    }
    try:
        for i in range(0, len(x), batch_size):
            xb, yb = to_float(x[i : i + batch_size].to(device)), y[i : i + batch_size].to(device)
            with autocast(device, precision):
                metrics["clean_acc"].update(model(xb), yb)
                if attack is not None:
                    metrics["robust_acc"].update(model(attack(model, xb, yb)), yb)
                if autoattack_eps is not None:
                    metrics["autoattack_acc"].update(
                        model(autoattack(model, xb, yb, autoattack_eps, num_classes)), yb
                    )
    finally:
        for m, mode in modes:
            m.training = mode
    out = {"clean_acc": 100 * metrics["clean_acc"].compute().item()}
    if attack is not None:
        out["robust_acc"] = 100 * metrics["robust_acc"].compute().item()
    if autoattack_eps is not None:
        out["autoattack_acc"] = 100 * metrics["autoattack_acc"].compute().item()
    return out
