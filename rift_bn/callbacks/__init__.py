"""Lightning callbacks: module selection, freezing and BatchNorm mode control."""

from rift_bn.callbacks.selection import BN_STATS, ModuleSelection, freeze_except, set_bn_modes

__all__ = ["BN_STATS", "ModuleSelection", "freeze_except", "set_bn_modes"]
