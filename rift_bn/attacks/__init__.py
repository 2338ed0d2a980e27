"""Attacks: our own batched PGD, and AutoAttack through torchattacks."""

from rift_bn.attacks.autoattack import autoattack
from rift_bn.attacks.pgd import PGD, attack_mode

__all__ = ["PGD", "attack_mode", "autoattack"]
