"""CIFAR / Tiny-ImageNet architectures: published parameter naming, input normalisation, model selection."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from rift_bn.config import ConfigError
from rift_bn.models.preact_resnet import PreActResNet, PreActResNet18
from rift_bn.models.resnet import ResNet, ResNet18, Stage
from rift_bn.models.wide_resnet import WideResNet
from rift_bn.schema import Kind, Model

__all__ = [
    "ARCHITECTURES",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "CANDIDATE_KINDS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Architecture",
    "ImageSpec",
    "Normalize",
    "NormalizedModel",
    "PreActResNet",
    "PreActResNet18",
    "ResNet",
    "ResNet18",
    "Stage",
    "WideResNet",
    "build_for",
    "build_model",
    "candidate_modules",
]

CIFAR_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR_STD: tuple[float, float, float] = (0.2471, 0.2435, 0.2616)
# Tiny-ImageNet: the ImageNet statistics, as RiFT's code normalises it (microsoft/robustlearn
# RiFT/main.py, dataloader.py, utils.py:evaluate_tiny_robustness). CIFAR-100 keeps CIFAR-10's, as there.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``; mean/std are non-persistent buffers (never in a state_dict)."""

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float] = CIFAR_MEAN, std: Sequence[float] = CIFAR_STD) -> None:
        super().__init__()
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class NormalizedModel(nn.Module):
    """``net(normalize(x))`` for images ``x`` in [0, 1]; state_dict keys are ``net.<published name>``."""

    def __init__(
        self, net: nn.Module, mean: Sequence[float] = CIFAR_MEAN, std: Sequence[float] = CIFAR_STD
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.normalize(x))

    def named_stages(self) -> list[tuple[str, nn.Module]]:
        """``(prefix, stage)`` in forward order, prefixes relative to this model (``net.layer1.0`` ...)."""
        return [("normalize", self.normalize)] + [
            (f"net.{p}" if p else "net", stage) for p, stage in self.net.named_stages()
        ]

    def stages(self) -> list[nn.Module]:
        """``[normalize] + net.stages()``: their sequential composition equals ``forward``."""
        return [self.normalize, *self.net.stages()]


@dataclass(frozen=True)
class Architecture:
    """A selectable architecture: ``builder(num_classes, width, image_size)`` and its standard width."""

    builder: Callable[[int, int, int], nn.Module]
    default_width: int
    description: str


ARCHITECTURES: dict[Model, Architecture] = {
    Model.resnet18: Architecture(
        lambda num_classes, width, image_size: ResNet18(num_classes, width, image_size),
        64,
        "ResNet-18 (kuangliu naming); width = channels of the first stage",
    ),
    Model.preact_resnet18: Architecture(
        lambda num_classes, width, image_size: PreActResNet18(num_classes, width, image_size),
        64,
        "PreAct ResNet-18; width = channels of the first stage",
    ),
    Model.wrn34_10: Architecture(
        lambda num_classes, width, image_size: WideResNet(34, num_classes, width, image_size),
        10,
        "WideResNet-34 (TRADES naming); width = widen factor",
    ),
}


def build_model(
    name: str,
    num_classes: int,
    width: int | None = None,
    image_size: int = 32,
    mean: Sequence[float] = CIFAR_MEAN,
    std: Sequence[float] = CIFAR_STD,
) -> NormalizedModel:
    """Build ``NormalizedModel(<architecture>, mean, std)``; ``width=None`` gives the architecture's standard
    width. ``image_size`` (input side, a multiple of 32) sizes the classifier; ``mean``/``std`` are the data
    set's (its ``rift_bn.data.DATASETS`` entry has all three)."""
    arch = ARCHITECTURES.get(name)
    if arch is None:
        raise ConfigError(f"model={name}: unknown architecture; choose one of {', '.join(ARCHITECTURES)}")
    if width is None:
        width = arch.default_width
    if width < 1:
        raise ConfigError(f"model.width={width}: must be a positive integer (or null for the standard width)")
    if num_classes < 1:
        raise ConfigError(f"num_classes={num_classes}: must be a positive integer")
    return NormalizedModel(arch.builder(num_classes, width, image_size), mean, std)


class ImageSpec(Protocol):
    """What a model needs to know of its data set (``rift_bn.data.CIFARSpec`` has it)."""

    @property
    def num_classes(self) -> int: ...
    @property
    def image_size(self) -> int: ...
    @property
    def mean(self) -> tuple[float, float, float]: ...
    @property
    def std(self) -> tuple[float, float, float]: ...


def build_for(data: ImageSpec, name: str, width: int | None = None) -> NormalizedModel:
    """:func:`build_model` for the data set ``data`` (its ``rift_bn.data.DATASETS`` entry): its classes,
    image size and normalisation. The one constructor of the pipeline, the benchmarks and the report."""
    return build_model(name, data.num_classes, width, data.image_size, data.mean, data.std)


CANDIDATE_KINDS: dict[Kind, type[nn.Module]] = {
    Kind.conv: nn.Conv2d,
    Kind.linear: nn.Linear,
    Kind.bn: nn.BatchNorm2d,
}


def candidate_modules(model: nn.Module, kinds: set[str]) -> list[tuple[str, nn.Module, str]]:
    """``(name, module, kind)`` for each Conv2d/Linear/BatchNorm2d of ``model.net`` with a kind in ``kinds``.

    Names are relative to ``model.net`` (published naming, no ``net.`` prefix), in ``named_modules`` order.
    A bare network without ``.net`` is searched directly.
    """
    unknown = set(kinds) - set(CANDIDATE_KINDS)
    if unknown:
        raise ConfigError(
            f"kinds={sorted(kinds)}: unknown module kind(s) {sorted(unknown)}; "
            f"choose from {', '.join(CANDIDATE_KINDS)}"
        )
    net = model.net if isinstance(model, NormalizedModel) else model
    out: list[tuple[str, nn.Module, str]] = []
    for name, module in net.named_modules():
        for kind, cls in CANDIDATE_KINDS.items():
            if kind in kinds and isinstance(module, cls):
                out.append((name, module, kind))
                break
    return out


@contextmanager
def frozen(model: nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """``requires_grad=False`` for every parameter and (``eval_mode``) eval mode; restored on exit.

    ``eval_mode=False`` keeps each module's train/eval mode as it is (a training-mode attack)."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    if eval_mode:
        model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode
