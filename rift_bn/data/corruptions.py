"""Common corruptions: CIFAR-10-C / CIFAR-100-C (Hendrycks & Dietterich, ICLR 2019) in their official layout.

``<data.root>/CIFAR-10-C/<corruption>.npy`` is uint8 ``(5n, 32, 32, 3)``, severity-major: rows
``[(s - 1) n, s n)`` hold severity ``s`` of the n test images, in test-set order (n = 10,000 in the
official files; any n is read, so the row count must be a multiple of 5); ``labels.npy`` holds the 5n labels
(the test labels once per severity; checked). The same for ``CIFAR-100-C``. Files are read lazily
(memory-mapped) one severity at a time.

``subset`` keeps the first ``subset`` images of every severity and corruption (the same test images
throughout, and the same as ``data.test_subset`` keeps of the clean test set).

Accuracy is :func:`rift_bn.evaluate.evaluate`'s, as for the test split (float32 unless ``precision`` says
otherwise, eval mode, the same attack); the results keep the integer counts, so every percentage is
``correct * 100 / total`` exactly. An ``attack``'s random starts draw from the global RNG: seed around the
call, as the pipeline does for the test split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from rift_bn.attacks import PGD
from rift_bn.data.cifar import DATASETS, DataError

# The 15 corruptions of the benchmark (Hendrycks & Dietterich; RobustBench), in the paper's order.
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
# The 4 held-out corruptions the official folders also hold.
EXTRA_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL_CORRUPTIONS: tuple[str, ...] = CORRUPTIONS + EXTRA_CORRUPTIONS
# RiFT's list (microsoft/robustlearn RiFT/utils.py:evaluate_cifar_corruption): 18 = the 19 without glass_blur;
# it reports per corruption the accuracy over all five severities together, and their mean ("avg").
RIFT_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "speckle_noise",
    "impulse_noise",
    "defocus_blur",
    "gaussian_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
    "spatter",
    "saturate",
    "frost",
)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

# data.name -> (folder under data.root, where the official files come from)
SOURCES: dict[str, tuple[str, str]] = {
    "cifar10": ("CIFAR-10-C", "https://zenodo.org/records/2535967"),
    "cifar100": ("CIFAR-100-C", "https://zenodo.org/records/3555552"),
}
SHAPE = (32, 32, 3)


def corruption_root(root: str | Path, dataset: str) -> Path:
    """``root/CIFAR-10-C`` (``cifar10``) or ``root/CIFAR-100-C`` (``cifar100``); raises if it is missing."""
    if dataset not in SOURCES:
        raise DataError(
            f"data.name={dataset}: no corruption benchmark is read for it; corruptions are evaluated on "
            f"{' and '.join(f'{d} ({f})' for d, (f, _) in SOURCES.items())}"
        )
    name, url = SOURCES[dataset]
    folder = Path(root).expanduser().resolve() / name
    if not folder.is_dir():
        raise DataError(
            f"data.root={folder.parent}: no {name}/ found at {folder}; download the official {name} "
            f"(Hendrycks & Dietterich) from {url} and extract it there"
        )
    return folder


def _require(folder: Path, file: str) -> Path:
    """``folder/file``; a one-line error if it is missing."""
    path = folder / file
    if not path.is_file():
        raise DataError(
            f"data.root={folder.parent}: no {file} in {folder}; the official {folder.name} holds all "
            f"{len(ALL_CORRUPTIONS)} corruptions and labels.npy: replace {folder.name}/ with it"
        )
    return path


def check_corruption_files(root: str | Path, dataset: str, names: Sequence[str]) -> Path:
    """:func:`corruption_root`, checked to hold ``<name>.npy`` of each of ``names`` and ``labels.npy``
    (present, not read): what a run checks before any work."""
    folder = corruption_root(root, dataset)
    for file in (*(f"{name}.npy" for name in names), "labels.npy"):
        _require(folder, file)
    return folder


def _array(folder: Path, file: str) -> np.ndarray:
    """``folder/file`` memory-mapped, with a one-line error for a missing, truncated or foreign file."""
    path = _require(folder, file)
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        raise DataError(
            f"data.root={folder.parent}: cannot read {path} ({type(e).__name__}: {e}); truncated? replace "
            f"{folder.name}/ with the official files"
        ) from None


def _check(name: str, value: object, allowed: Sequence[object], key: str) -> None:
    if value not in allowed:
        raise DataError(f"{key}={value}: unknown {name}; choose from {', '.join(map(str, allowed))}")


def load_corruption(
    root: str | Path, dataset: str, name: str, severity: int, subset: int | None = None
) -> tuple[Tensor, Tensor]:
    """Corruption ``name`` at ``severity`` (1..5) as ``(x, y)``: uint8 ``(n, 3, 32, 32)``, int64 labels;
    the first ``subset`` images only if given (at most all n)."""
    _check("corruption", name, ALL_CORRUPTIONS, "eval.corruptions")
    _check("severity", severity, SEVERITIES, "severity")
    if subset is not None and subset < 1:
        raise DataError(
            f"eval.corruptions_subset={subset}: must be >= 1, or null for every image of a severity"
        )
    folder = corruption_root(root, dataset)
    images, labels = _array(folder, f"{name}.npy"), _array(folder, "labels.npy")
    rows = len(images)
    if images.dtype != np.uint8 or images.shape[1:] != SHAPE or not rows or rows % len(SEVERITIES):
        raise DataError(
            f"data.root={folder.parent}: {folder / f'{name}.npy'} holds {images.dtype} {images.shape}, "
            f"not uint8 (5n, 32, 32, 3) (n images x 5 severities); replace it with the official file"
        )
    n = rows // len(SEVERITIES)
    if (
        labels.shape != (rows,)
        or not np.issubdtype(labels.dtype, np.integer)
        or any(not np.array_equal(labels[:n], labels[s * n : (s + 1) * n]) for s in range(1, len(SEVERITIES)))
    ):
        raise DataError(
            f"data.root={folder.parent}: {folder / 'labels.npy'} holds {labels.shape} labels, not the {n} "
            f"labels of {name}.npy's images once per severity; replace it with the official file"
        )
    start = (severity - 1) * n
    stop = start + (n if subset is None else min(subset, n))
    x = torch.from_numpy(np.ascontiguousarray(images[start:stop].transpose(0, 3, 1, 2)))
    return x, torch.from_numpy(labels[start:stop].astype(np.int64))


@dataclass(frozen=True)
class CorruptionAccuracy:
    """Correct counts ``correct[name][severity][metric]`` of :func:`evaluate_corruptions`, ``total`` images
    each; ``metric`` as :func:`rift_bn.evaluate.evaluate` names them (``clean_acc``, ``robust_acc``)."""

    total: int
    correct: dict[str, dict[int, dict[str, int]]]

    def table(self, metric: str = "clean_acc") -> dict[str, dict[int, float]]:
        """``{name: {severity: accuracy in percent}}``."""
        return {
            name: {s: c[metric] * 100 / self.total for s, c in by_severity.items()}
            for name, by_severity in self.correct.items()
        }

    def mean(self, metric: str = "clean_acc") -> float:
        """The accuracy over every corruption and severity, in percent (all cells have ``total`` images)."""
        counts = [c[metric] for by_severity in self.correct.values() for c in by_severity.values()]
        return sum(counts) * 100 / (len(counts) * self.total)


def evaluate_corruptions(
    model: nn.Module,
    root: str | Path,
    dataset: str,
    names: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    subset: int | None = None,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    precision: str = "32-true",
    attack: PGD | None = None,
) -> CorruptionAccuracy:
    """Clean (and, with ``attack``, robust) accuracy of ``model`` (already on ``device``) on each corruption
    of ``names`` at each of ``severities``, computed by :func:`rift_bn.evaluate.evaluate`."""
    from rift_bn.evaluate import evaluate  # not at the top: rift_bn.evaluate imports rift_bn.data

    if not names or not severities:
        raise DataError("eval.corruptions, severities: both must list at least one entry")
    correct: dict[str, dict[int, dict[str, int]]] = {}
    total = 0
    for name in names:
        correct[name] = {}
        for severity in severities:
            x, y = load_corruption(root, dataset, name, severity, subset)
            if total and len(y) != total:
                raise DataError(
                    f"data.root={root}: {name}.npy holds {len(y)} images per severity where the others hold "
                    f"{total}; replace {SOURCES[dataset][0]}/ with the official files"
                )
            total = len(y)
            accs = evaluate(model, x, y, attack, DATASETS[dataset].num_classes, batch_size, device, precision)
            correct[name][severity] = {k: _count(acc, total) for k, acc in accs.items()}
    return CorruptionAccuracy(total, correct)


def _count(acc: float, total: int) -> int:
    """The number of correct images behind ``evaluate``'s percentage: its float32 fraction lies far nearer
    to ``correct / total`` than half an image, so rounding recovers the count exactly."""
    count = round(acc * total / 100)
    if abs(acc * total / 100 - count) > 0.01:
        raise RuntimeError(f"accuracy {acc}% of {total} images is no whole number of images")
    return count
