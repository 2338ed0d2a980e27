"""ResNet-18 for 32x32 CIFAR (and 64x64 Tiny-ImageNet) inputs with the kuangliu/pytorch-cifar naming.

State-dict keys match the published adversarial-training and RiFT checkpoints exactly
(``conv1``, ``bn1``, ``layer1.0.conv1`` ... ``layer2.0.shortcut.0`` ... ``linear``).

Larger inputs follow RiFT's code (microsoft/robustlearn ``RiFT/models/resnet.py``, ``wide_resnet.py``,
built with ``--input_size 64`` for Tiny-ImageNet): the same 3x3 stride-1 stem and strides, the same
fixed-size average pool, and a classifier over the flattened ``(image_size // 32)**2`` pooled cells
(``Linear(512 * 4, classes)`` for ResNet-18 at 64x64: its 8x8 last map pools 4x4 to 2x2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn


def pooled_cells(image_size: int) -> int:
    """How many cells the head's fixed-size average pool leaves: ``(image_size // 32) ** 2`` (RiFT's rule)."""
    if image_size < 32 or image_size % 32:
        raise ValueError(
            f"image_size={image_size}: must be a multiple of 32 (32 for CIFAR, 64 for Tiny-ImageNet)"
        )
    return (image_size // 32) ** 2


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


class StagedNet(nn.Module):
    """A CIFAR network as stem, groups of blocks, head: ``forward`` and the stages MRC's fast path uses.

    Subclasses name their ``groups`` (each an ``nn.Sequential`` of blocks, or a module holding one as
    ``.layer``), the submodules their ``_stem`` and ``_head`` use, and define those two functions.
    """

    groups: tuple[str, ...] = ()
    stem_modules: tuple[str, ...] = ()
    head_modules: tuple[str, ...] = ()

    def _stem(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _head(self, out: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        out = self._stem(x)
        for group in self.groups:
            out = getattr(self, group)(out)
        return self._head(out)

    def _blocks(self, group: str) -> tuple[str, nn.Sequential]:
        """One group's name prefix and its sequence of blocks."""
        seq = getattr(self, group)
        return (group, seq) if isinstance(seq, nn.Sequential) else (f"{group}.layer", seq.layer)

    def named_stages(self) -> list[tuple[str, nn.Module]]:
        """``(prefix, stage)`` in forward order; ``prefix`` + parameter name = this network's name."""
        blocks = [
            (f"{prefix}.{i}", block)
            for prefix, seq in map(self._blocks, self.groups)
            for i, block in enumerate(seq)
        ]
        return [
            ("", Stage(self._stem, **{n: getattr(self, n) for n in self.stem_modules})),
            *blocks,
            ("", Stage(self._head, **{n: getattr(self, n) for n in self.head_modules})),
        ]

    def stages(self) -> list[nn.Module]:
        """Modules whose sequential composition equals ``forward`` (stem, every block, head)."""
        return [stage for _, stage in self.named_stages()]


class FourGroupResNet(StagedNet):
    """The body ResNet and PreAct ResNet share: ``layer1..4`` of ``block`` at widths w, 2w, 4w, 8w."""

    block: type[nn.Module] = nn.Module
    groups = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, num_classes: int, width: int, image_size: int) -> None:
        super().__init__()
        if width < 1 or num_classes < 1:
            raise ValueError(f"width={width}, num_classes={num_classes}: both must be positive")
        self.width = width
        self.num_classes = num_classes
        self.image_size = image_size
        # what the head's 4x4 pool leaves of the last stage, flattened
        self.head_features = 8 * width * self.block.expansion * pooled_cells(image_size)
        self.in_planes = width

    def _add_groups(self, num_blocks: list[int]) -> None:
        for i, (n, stride) in enumerate(zip(num_blocks, (1, 2, 2, 2), strict=True)):
            self.add_module(self.groups[i], self._make_layer(self.width * 2**i, n, stride))

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(self.block(self.in_planes, planes, s))
            self.in_planes = planes * self.block.expansion
        return nn.Sequential(*layers)


class ResNet(FourGroupResNet):
    """CIFAR ResNet (3x3 stride-1 stem, four stages of ``BasicBlock``, 4x4 average pool, ``linear``).

    ``image_size`` is the input's side (a multiple of 32): the pool stays 4x4, ``linear`` takes the
    flattened pooled cells (RiFT's rule, see the module docstring)."""

    block = BasicBlock
    stem_modules = ("conv1", "bn1")
    head_modules = ("linear",)

    def __init__(
        self, num_blocks: list[int], num_classes: int = 10, width: int = 64, image_size: int = 32
    ) -> None:
        super().__init__(num_classes, width, image_size)
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self._add_groups(num_blocks)
        self.linear = nn.Linear(self.head_features, num_classes)

    def _stem(self, x: Tensor) -> Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def _head(self, out: Tensor) -> Tensor:
        return self.linear(F.avg_pool2d(out, 4).flatten(1))


def ResNet18(num_classes: int = 10, width: int = 64, image_size: int = 32) -> ResNet:
    """ResNet-18; ``width``: channels of the first stage (64 = standard); ``image_size``: the input's side."""
    return ResNet([2, 2, 2, 2], num_classes=num_classes, width=width, image_size=image_size)
