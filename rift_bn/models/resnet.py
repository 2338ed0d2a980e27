"""ResNet-18 for 32x32 CIFAR inputs with the kuangliu/pytorch-cifar parameter naming.

State-dict keys match the published adversarial-training and RiFT checkpoints exactly
(``conv1``, ``bn1``, ``layer1.0.conv1`` ... ``layer2.0.shortcut.0`` ... ``linear``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn


class Stage(nn.Module):
    """One forward-order piece of a network, built on demand by ``stages()``.

    ``fn`` is a (bound) function of the owning network; ``modules`` are the network's own submodules
    that ``fn`` uses, registered here by reference (never copied) so that ``stage.parameters()``
    yields the very same ``Parameter`` objects as the network. A stage is never assigned as an
    attribute of the network, so it adds no state-dict keys there.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], **modules: nn.Module) -> None:
        super().__init__()
        self._fn = fn
        for name, module in modules.items():
            self.add_module(name, module)

    def forward(self, x: Tensor) -> Tensor:
        return self._fn(x)


class BasicBlock(nn.Module):
    """Post-activation basic block: conv-bn-relu-conv-bn + shortcut, then relu."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class ResNet(nn.Module):
    """CIFAR ResNet (3x3 stride-1 stem, four stages of ``BasicBlock``, 4x4 average pool, ``linear``)."""

    def __init__(self, num_blocks: list[int], num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        if width < 1 or num_classes < 1:
            raise ValueError(f"width={width}, num_classes={num_classes}: both must be positive")
        self.width = width
        self.num_classes = num_classes
        self.in_planes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(width, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(2 * width, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(4 * width, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(8 * width, num_blocks[3], stride=2)
        self.linear = nn.Linear(8 * width * BasicBlock.expansion, num_classes)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes * BasicBlock.expansion
        return nn.Sequential(*layers)

    def _stem(self, x: Tensor) -> Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def _head(self, out: Tensor) -> Tensor:
        out = F.avg_pool2d(out, 4)
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
            ("", Stage(self._stem, conv1=self.conv1, bn1=self.bn1)),
            *blocks,
            ("", Stage(self._head, linear=self.linear)),
        ]

    def stages(self) -> list[nn.Module]:
        """Modules whose sequential composition equals ``forward`` (stem, every block, head)."""
        return [stage for _, stage in self.named_stages()]


def ResNet18(num_classes: int = 10, width: int = 64) -> ResNet:
    """ResNet-18; ``width`` is the channel count of the first stage (64 = standard)."""
    return ResNet([2, 2, 2, 2], num_classes=num_classes, width=width)
