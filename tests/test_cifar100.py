"""CIFAR-100 from its official python layout (written small, with the official ``meta``): 100 classes, the
fine labels, the label names."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from rift_bn.data import DATASETS, CIFARDataModule, augment, class_names, load_cifar, to_float
from rift_bn.models import CIFAR_MEAN, CIFAR_STD, build_model
from tests.conftest import write_fake_cifar100


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_cifar100(tmp_path_factory.mktemp("cifar100"), 250, 120, seed=0)


def _pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def test_fine_labels_and_images(root: Path) -> None:
    folder = root / "cifar-100-python"
    tx, ty, vx, vy = load_cifar("cifar100", root, download=False)
    assert DATASETS["cifar100"].num_classes == 100
    for x, y, split in ((tx, ty, "train"), (vx, vy, "test")):
        d = _pickle(folder / split)
        assert y.dtype == torch.int64 and y.tolist() == d[b"fine_labels"] != d[b"coarse_labels"]
        assert sorted(set(y.tolist())) == list(range(100))
        assert x.dtype == torch.uint8 and torch.equal(x, torch.from_numpy(d[b"data"]).reshape(-1, 3, 32, 32))
        ids = x[:, 0, 0, 0].long() + 256 * x[:, 0, 0, 1].long()  # the writer's index in the R plane
        assert ids.tolist() == list(range(len(y)))


def test_label_names_from_meta(root: Path) -> None:
    names = class_names("cifar100", root, download=False)
    assert len(names) == 100 and names[:3] == ["apple", "aquarium_fish", "baby"] and names[-1] == "worm"
    meta = _pickle(root / "cifar-100-python" / "meta")
    assert names == [n.decode() for n in meta[b"fine_label_names"]]


def test_datamodule_and_model(root: Path) -> None:
    dm = CIFARDataModule("cifar100", root, val_size=50, test_subset=60, download=False, batch_size=32)
    dm.setup()
    assert dm.num_classes == 100 and (len(dm.train_x), len(dm.val_x), dm.test_size) == (200, 50, 60)
    x, y = next(iter(dm.train_dataloader()))
    xf = augment(to_float(x), pad=dm.spec.pad)
    model = build_model("resnet18", dm.num_classes, 4, dm.spec.image_size, dm.spec.mean, dm.spec.std).eval()
    with torch.no_grad():
        assert model(xf).shape == (32, 100)
    # normalised with CIFAR-10's statistics, as RiFT's code does
    assert (dm.spec.mean, dm.spec.std, dm.spec.pad) == (CIFAR_MEAN, CIFAR_STD, 4)
