"""PreAct ResNet-18 for 32x32 CIFAR (and 64x64) inputs, common naming (Rice et al. / RiFT checkpoints).

Keys: ``conv1``, ``layer1.0.bn1``, ``layer1.0.conv1``, ``layer1.0.bn2``, ``layer1.0.conv2``,
``layer2.0.shortcut.0`` (a 1x1 ``Conv2d`` inside a ``Sequential``) ... final ``bn`` and ``linear``.

RiFT's PreAct ResNet has no input-size option (``RiFT/models/preact_resnet.py``); larger inputs here follow
its ResNet's rule (:mod:`rift_bn.models.resnet`): same stem, fixed 4x4 pool, ``linear`` over the
flattened ``(image_size // 32)**2`` pooled cells.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from rift_bn.models.resnet import FourGroupResNet


class PreActBlock(nn.Module):
    """Pre-activation basic block: bn-relu-conv-bn-relu-conv + shortcut (no final relu)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Sequential | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(FourGroupResNet):
    """CIFAR PreAct ResNet (3x3 stem conv, four stages, final ``bn`` + relu, 4x4 average pool, ``linear``).

    ``image_size`` is the input's side (a multiple of 32); ``linear`` takes the flattened pooled cells."""

    block = PreActBlock
    stem_modules = ("conv1",)
    head_modules = ("bn", "linear")

    def __init__(
        self, num_blocks: list[int], num_classes: int = 10, width: int = 64, image_size: int = 32
    ) -> None:
        super().__init__(num_classes, width, image_size)
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self._add_groups(num_blocks)
        self.bn = nn.BatchNorm2d(8 * width * PreActBlock.expansion)
        self.linear = nn.Linear(self.head_features, num_classes)

    def _stem(self, x: Tensor) -> Tensor:
        return self.conv1(x)

    def _head(self, out: Tensor) -> Tensor:
        return self.linear(F.avg_pool2d(F.relu(self.bn(out)), 4).flatten(1))


def PreActResNet18(num_classes: int = 10, width: int = 64, image_size: int = 32) -> PreActResNet:
    """PreAct ResNet-18; ``width``: first-stage channels (64 = standard); ``image_size``: the input's side."""
    return PreActResNet([2, 2, 2, 2], num_classes=num_classes, width=width, image_size=image_size)
