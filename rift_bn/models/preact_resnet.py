"""PreAct ResNet-18 for 32x32 CIFAR inputs with the common naming (Rice et al. / RiFT checkpoints).

Keys: ``conv1``, ``layer1.0.bn1``, ``layer1.0.conv1``, ``layer1.0.bn2``, ``layer1.0.conv2``,
``layer2.0.shortcut.0`` (a 1x1 ``Conv2d`` inside a ``Sequential``) ... final ``bn`` and ``linear``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from rift_bn.models.resnet import Stage


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


class PreActResNet(nn.Module):
    """CIFAR PreAct ResNet (3x3 stem conv, four stages, final ``bn`` + relu, 4x4 average pool, ``linear``)."""

    def __init__(self, num_blocks: list[int], num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        if width < 1 or num_classes < 1:
            raise ValueError(f"width={width}, num_classes={num_classes}: both must be positive")
        self.width = width
        self.num_classes = num_classes
        self.in_planes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(width, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(2 * width, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(4 * width, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(8 * width, num_blocks[3], stride=2)
        self.bn = nn.BatchNorm2d(8 * width * PreActBlock.expansion)
        self.linear = nn.Linear(8 * width * PreActBlock.expansion, num_classes)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes * PreActBlock.expansion
        return nn.Sequential(*layers)

    def _stem(self, x: Tensor) -> Tensor:
        return self.conv1(x)

    def _head(self, out: Tensor) -> Tensor:
        out = F.avg_pool2d(F.relu(self.bn(out)), 4)
        return self.linear(out.view(out.size(0), -1))

    def forward(self, x: Tensor) -> Tensor:
        out = self._stem(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self._head(out)

    def named_stages(self) -> list[tuple[str, nn.Module]]:
        """``(prefix, stage)`` in forward order; ``prefix`` + parameter name = this network's name."""
        blocks = [
            (f"{name}.{i}", block)
            for name in ("layer1", "layer2", "layer3", "layer4")
            for i, block in enumerate(getattr(self, name))
        ]
        return [
            ("", Stage(self._stem, conv1=self.conv1)),
            *blocks,
            ("", Stage(self._head, bn=self.bn, linear=self.linear)),
        ]

    def stages(self) -> list[nn.Module]:
        """Modules whose sequential composition equals ``forward`` (stem conv, every block, head)."""
        return [stage for _, stage in self.named_stages()]


def PreActResNet18(num_classes: int = 10, width: int = 64) -> PreActResNet:
    """PreAct ResNet-18; ``width`` is the channel count of the first stage (64 = standard)."""
    return PreActResNet([2, 2, 2, 2], num_classes=num_classes, width=width)
