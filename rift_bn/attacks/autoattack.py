"""AutoAttack (standard, L-inf) through torchattacks' maintained implementation, not our own."""

from __future__ import annotations

from torch import Tensor, nn

from rift_bn.attacks.pgd import attack_mode


def autoattack(model: nn.Module, x: Tensor, y: Tensor, eps: float, num_classes: int, seed: int = 0) -> Tensor:
    """Adversarial images from the standard AutoAttack suite (APGD-CE, APGD-T, FAB-T, Square)."""
    import torchattacks

    attack = torchattacks.AutoAttack(
        model, norm="Linf", eps=eps, version="standard", n_classes=num_classes, seed=seed
    )
    with attack_mode(model):
        return attack(x, y).detach()
