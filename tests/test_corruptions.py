"""rift_bn.data.corruptions: the official CIFAR-10-C / CIFAR-100-C layout (severity-major), subsets, errors,
and accuracies that are exact fractions computed as the test split's are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from rift_bn.attacks import PGD
from rift_bn.data import (
    ALL_CORRUPTIONS,
    CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    RIFT_CORRUPTIONS,
    SEVERITIES,
    DataError,
    corruption_root,
    evaluate_corruptions,
    load_corruption,
    to_float,
)
from rift_bn.data.corruptions import check_corruption_files
from rift_bn.errors import UserError
from rift_bn.evaluate import evaluate
from rift_bn.models import build_model
from tests.conftest import write_fake_cifar10_c

NAMES = ("gaussian_noise", "fog", "saturate")
N = 12  # images per severity


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corruptions")
    write_fake_cifar10_c(root, NAMES, N, seed=0)
    return root


def _labels(root: Path) -> np.ndarray:
    return np.load(root / "CIFAR-10-C" / "labels.npy")[:N]


def test_corruption_lists() -> None:
    assert len(CORRUPTIONS) == len(set(CORRUPTIONS)) == 15 and "glass_blur" in CORRUPTIONS
    assert set(EXTRA_CORRUPTIONS) == {"speckle_noise", "gaussian_blur", "spatter", "saturate"}
    assert len(set(ALL_CORRUPTIONS)) == 19 and not set(CORRUPTIONS) & set(EXTRA_CORRUPTIONS)
    assert set(RIFT_CORRUPTIONS) == set(ALL_CORRUPTIONS) - {"glass_blur"} and len(RIFT_CORRUPTIONS) == 18
    assert SEVERITIES == (1, 2, 3, 4, 5)


def test_severity_major_order(root: Path) -> None:
    raw = np.load(root / "CIFAR-10-C" / "fog.npy")
    for c, name in enumerate(NAMES):
        for s in SEVERITIES:
            x, y = load_corruption(root, "cifar10", name, s)
            assert x.shape == (N, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
            assert x[:, 0, 0, 0].tolist() == [s] * N  # R of pixel (0, 0): the severity
            assert x[:, 1, 0, 0].tolist() == list(range(N))  # G: the test image's index
            assert x[:, 2, 0, 0].tolist() == [c] * N  # B: which corruption file
            assert y.tolist() == _labels(root).tolist()
    x, _ = load_corruption(root, "cifar10", "fog", 3)
    for i in (0, 5, N - 1):  # NCHW of the file's NHWC rows 2N + i
        assert torch.equal(x[i], torch.from_numpy(raw[2 * N + i]).permute(2, 0, 1))


def test_subset_same_images_for_every_severity_and_corruption(root: Path) -> None:
    for name in NAMES:
        for s in SEVERITIES:
            x, y = load_corruption(root, "cifar10", name, s, subset=4)
            full_x, full_y = load_corruption(root, "cifar10", name, s)
            assert torch.equal(x, full_x[:4]) and torch.equal(y, full_y[:4])
            assert x[:, 1, 0, 0].tolist() == [0, 1, 2, 3] and x[:, 0, 0, 0].tolist() == [s] * 4
    assert len(load_corruption(root, "cifar10", "fog", 2, subset=10 * N)[0]) == N  # at most all
    with pytest.raises(DataError, match=r"^eval.corruptions_subset=0: must be >= 1"):
        load_corruption(root, "cifar10", "fog", 1, subset=0)


def test_missing_folder_names_path_and_source(tmp_path: Path) -> None:
    for dataset, folder, url in (
        ("cifar10", "CIFAR-10-C", "https://zenodo.org/records/2535967"),
        ("cifar100", "CIFAR-100-C", "https://zenodo.org/records/3555552"),
    ):
        with pytest.raises(DataError) as e:
            load_corruption(tmp_path, dataset, "fog", 1)
        msg = str(e.value)
        assert isinstance(e.value, UserError)
        assert "\n" not in msg and msg.startswith(f"data.root={tmp_path.resolve()}:")
        assert str(tmp_path.resolve() / folder) in msg and url in msg
    with pytest.raises(DataError, match=r"^data.name=tiny_imagenet: no corruption benchmark"):
        corruption_root(tmp_path, "tiny_imagenet")


def test_checked_before_reading(tmp_path: Path) -> None:
    """What a run checks before any work: the folder, each named file and labels.npy (not read)."""
    folder = write_fake_cifar10_c(tmp_path, ("fog", "snow"), 2, seed=0)
    assert check_corruption_files(tmp_path, "cifar10", ("fog", "snow")) == folder.resolve()
    with pytest.raises(DataError, match=r"^data.root=.*: no frost.npy in .*CIFAR-10-C; the official"):
        check_corruption_files(tmp_path, "cifar10", ("fog", "frost"))
    (folder / "labels.npy").unlink()
    with pytest.raises(DataError, match="no labels.npy"):
        check_corruption_files(tmp_path, "cifar10", ("fog",))
    with pytest.raises(DataError, match="no CIFAR-100-C/ found"):
        check_corruption_files(tmp_path, "cifar100", ("fog",))


def test_cifar100_c_folder(tmp_path: Path) -> None:
    write_fake_cifar10_c(tmp_path, ("snow",), 3, seed=1).rename(tmp_path / "CIFAR-100-C")
    assert corruption_root(tmp_path, "cifar100") == tmp_path.resolve() / "CIFAR-100-C"
    x, _ = load_corruption(tmp_path, "cifar100", "snow", 4)
    assert x.shape == (3, 3, 32, 32) and x[:, 0, 0, 0].tolist() == [4, 4, 4]
    with pytest.raises(DataError, match="CIFAR-10-C"):
        load_corruption(tmp_path, "cifar10", "snow", 4)


def _one_line_error(root: Path, name: str, *fragments: str) -> None:
    with pytest.raises(DataError) as e:
        load_corruption(root, "cifar10", name, 1)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("data.root="), msg
    for fragment in fragments:
        assert fragment in msg, msg


def test_bad_files_refused(tmp_path: Path) -> None:
    folder = write_fake_cifar10_c(tmp_path, ("fog", "snow", "frost", "contrast"), 4, seed=2)
    data = (folder / "fog.npy").read_bytes()
    (folder / "fog.npy").write_bytes(data[: len(data) // 2])  # a download cut short
    _one_line_error(tmp_path, "fog", "fog.npy", "truncated")
    np.save(folder / "snow.npy", np.zeros((20, 32, 32), np.uint8))  # no channel axis
    _one_line_error(tmp_path, "snow", "snow.npy", "(20, 32, 32)", "not uint8 (5n, 32, 32, 3)")
    np.save(folder / "snow.npy", np.zeros((19, 32, 32, 3), np.uint8))  # not 5 severities
    _one_line_error(tmp_path, "snow", "snow.npy", "(19, 32, 32, 3)")
    np.save(folder / "snow.npy", np.zeros((20, 32, 32, 3), np.float32))
    _one_line_error(tmp_path, "snow", "float32")
    _one_line_error(tmp_path, "glass_blur", "no glass_blur.npy")  # not written
    labels = np.load(folder / "labels.npy")
    np.save(folder / "labels.npy", labels[:-1])  # fewer labels than images
    _one_line_error(tmp_path, "frost", "labels.npy", "(19,)")
    bad = labels.copy()
    bad[4 * 4] = (bad[4 * 4] + 1) % 10  # severity 5 disagrees with severity 1
    np.save(folder / "labels.npy", bad)
    _one_line_error(tmp_path, "frost", "once per severity")
    np.save(folder / "labels.npy", labels)
    assert load_corruption(tmp_path, "cifar10", "frost", 5)[0].shape == (4, 3, 32, 32)
    with pytest.raises(DataError, match=r"^eval.corruptions=rain: unknown corruption; choose from"):
        load_corruption(tmp_path, "cifar10", "rain", 1)
    with pytest.raises(DataError, match=r"^severity=6: unknown severity"):
        load_corruption(tmp_path, "cifar10", "frost", 6)


class IndexClassifier(nn.Module):
    """Predicts ``table[index]`` from the index :func:`write_fake_cifar10_c` writes into pixel (0, 0)."""

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, x: Tensor) -> Tensor:
        index = (x[:, 1, 0, 0] * 255).round().long()
        return nn.functional.one_hot(self.table[index], 10).float()


def test_evaluate_corruptions_exact_counts(root: Path) -> None:
    names, severities = ("fog", "saturate"), (1, 3, 5)
    table = torch.from_numpy(_labels(root).astype(np.int64))
    table[[1, 4, 7]] = (table[[1, 4, 7]] + 1) % 10  # wrong on 3 of the first 10 images
    model = IndexClassifier(table)
    res = evaluate_corruptions(model, root, "cifar10", names, severities, subset=10, batch_size=3)
    correct = 7
    assert res.total == 10
    assert res.correct == {n: {s: {"clean_acc": correct} for s in severities} for n in names}
    assert res.table() == {n: {s: correct * 100 / 10 for s in severities} for n in names}
    assert res.mean() == correct * 100 / 10

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))  # predictions vary with the images
    res = evaluate_corruptions(model, root, "cifar10", NAMES, SEVERITIES, batch_size=5)
    direct = {}
    for name in NAMES:
        for s in SEVERITIES:
            x, y = load_corruption(root, "cifar10", name, s)
            with torch.no_grad():
                direct[name, s] = int((model(to_float(x)).argmax(1) == y).sum())
            assert res.correct[name][s] == {"clean_acc": direct[name, s]}
            assert res.table()[name][s] == direct[name, s] * 100 / N
    assert len(set(direct.values())) > 1
    assert res.mean() == sum(direct.values()) * 100 / (len(direct) * N)


def test_evaluate_corruptions_with_attack_matches_evaluate(root: Path) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 10, width=2).eval()
    attack = PGD(eps=8 / 255, alpha=2 / 255, steps=2)
    torch.manual_seed(7)
    res = evaluate_corruptions(model, root, "cifar10", ("fog",), (2,), subset=8, batch_size=4, attack=attack)
    x, y = load_corruption(root, "cifar10", "fog", 2, subset=8)
    torch.manual_seed(7)
    accs = evaluate(model, x, y, attack, 10, batch_size=4)
    assert set(res.correct["fog"][2]) == {"clean_acc", "robust_acc"}
    for metric, acc in accs.items():
        assert res.table(metric)["fog"][2] == pytest.approx(acc, abs=1e-4)
        assert res.correct["fog"][2][metric] * 100 / 8 == res.table(metric)["fog"][2]
    assert res.correct["fog"][2]["robust_acc"] <= res.correct["fog"][2]["clean_acc"]
