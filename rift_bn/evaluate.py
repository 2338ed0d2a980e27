"""Clean and robust accuracy of a model on in-memory uint8 images, image by image."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

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
def per_image(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: PGD | None,
    num_classes: int,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    precision: str = "32-true",
    autoattack_eps: float | None = None,
) -> dict[str, Tensor]:
    """Which images the model gets right (bool per image, on the CPU): ``clean``, under ``attack``
    (``robust``, if given) and under AutoAttack (``autoattack``, if ``autoattack_eps``). Top-1 by argmax,
    as torchmetrics' micro accuracy counts it."""
    device = torch.device(device)
    modes = [(m, m.training) for m in model.modules()]  # per module: a mixed state comes back as it was
    model.eval()
    out: dict[str, list[Tensor]] = {"clean": [], "robust": [], "autoattack": []}
    try:
        for i in range(0, len(x), batch_size):
            xb, yb = to_float(x[i : i + batch_size].to(device)), y[i : i + batch_size].to(device)
            with autocast(device, precision):
                out["clean"].append(model(xb).argmax(1) == yb)
                if attack is not None:
                    out["robust"].append(model(attack(model, xb, yb)).argmax(1) == yb)
                if autoattack_eps is not None:
                    adv = autoattack(model, xb, yb, autoattack_eps, num_classes)
                    out["autoattack"].append(model(adv).argmax(1) == yb)
    finally:
        for m, mode in modes:
            m.training = mode
    return {k: torch.cat(v).cpu() for k, v in out.items() if v}


def accuracies(correct: dict[str, Tensor]) -> dict[str, float]:
    """``{clean_acc, robust_acc, autoattack_acc}`` in percent, each the exact fraction of its counts
    (``correct * 100 / images``, no float32 rounding)."""
    return {f"{k}_acc": int(v.sum()) * 100 / len(v) for k, v in correct.items()}


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
    return accuracies(
        per_image(model, x, y, attack, num_classes, batch_size, device, precision, autoattack_eps)
    )
