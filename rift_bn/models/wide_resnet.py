"""WideResNet (default WRN-34-10) for 32x32 CIFAR (and 64x64) inputs with the TRADES parameter naming.

Keys: ``conv1``, ``block1.layer.0.bn1``, ``block1.layer.0.conv1``, ``block1.layer.0.bn2``,
``block1.layer.0.conv2``, ``block1.layer.0.convShortcut`` (only where in/out channels differ) ...
final ``bn1`` and ``fc``. The unused ``sub_block1`` of the TRADES code is omitted; the keys of published
checkpoints that carry it are ignored on import (``unused_checkpoint_prefixes``).

Larger inputs as in RiFT's ``WideResNet(image_size=64)`` (``RiFT/models/wide_resnet.py``): same stem and
strides, the fixed 8x8 average pool, ``fc`` over the flattened ``(image_size // 32)**2`` pooled cells
(``Linear(640 * 4, classes)`` for WRN-34-10 at 64x64: its 16x16 last map pools to 2x2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rift_bn.models.resnet import StagedNet, pooled_cells


class WideBasicBlock(nn.Module):
    """TRADES pre-activation wide block (dropout omitted: the published models use drop rate 0)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut: nn.Conv2d | None = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(
                in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False
            )

    def forward(self, x: Tensor) -> Tensor:
        if self.convShortcut is None:
            out = self.conv1(self.relu1(self.bn1(x)))
            shortcut = x
        else:
            x = self.relu1(self.bn1(x))
            out = self.conv1(x)
            shortcut = self.convShortcut(x)
        out = self.conv2(self.relu2(self.bn2(out)))
        return shortcut + out


class NetworkBlock(nn.Module):
    """A stage of ``nb_layers`` wide blocks, stored as ``self.layer`` (TRADES naming)."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                for i in range(nb_layers)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(StagedNet):
    """WideResNet-``depth``-``width`` (``width`` = widen factor; channels 16, 16w, 32w, 64w).

    ``image_size`` is the input's side (a multiple of 32); ``fc`` takes the flattened pooled cells."""

    groups = ("block1", "block2", "block3")
    stem_modules = ("conv1",)
    head_modules = ("bn1", "fc")
    unused_checkpoint_prefixes = ("sub_block1.",)  # TRADES' WRN builds it but its forward never uses it

    def __init__(self, depth: int = 34, num_classes: int = 10, width: int = 10, image_size: int = 32) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"depth={depth}: WideResNet depth must be 6n+4 with n >= 1 (e.g. 16, 28, 34)")
        if width < 1 or num_classes < 1:
            raise ValueError(f"width={width}, num_classes={num_classes}: both must be positive")
        n = (depth - 4) // 6
        channels = [16, 16 * width, 32 * width, 64 * width]
        self.depth = depth
        self.width = width
        self.num_classes = num_classes
        self.image_size = image_size
        self.nChannels = channels[3]
        self.conv1 = nn.Conv2d(3, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3] * pooled_cells(image_size), num_classes)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """TRADES initialisation: He-normal (fan-out) convs, unit/zero BN, zero linear bias."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.normal_(0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.zero_()

    def _stem(self, x: Tensor) -> Tensor:
        return self.conv1(x)

    def _head(self, out: Tensor) -> Tensor:
        return self.fc(F.avg_pool2d(self.relu(self.bn1(out)), 8).flatten(1))
