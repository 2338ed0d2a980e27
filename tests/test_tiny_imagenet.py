"""Tiny-ImageNet: the official layout (validation labels from val_annotations.txt), the decode cache, the
download, the data module at 64x64 (crop padding 8), and the models adapted to 64x64 inputs as RiFT's."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rift_bn.data import (
    DATASETS,
    CIFARDataModule,
    DataError,
    augment,
    augment_params,
    class_names,
    crop_flip,
    load_cifar,
    to_float,
)
from rift_bn.data import tiny_imagenet as tiny
from rift_bn.models import ARCHITECTURES, CIFAR_MEAN, IMAGENET_MEAN, IMAGENET_STD, build_model
from tests.conftest import tiny_imagenet_colour, write_fake_tiny_imagenet

CLASSES, PER_CLASS, N_VAL = 5, 3, 13


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    write_fake_tiny_imagenet(root, CLASSES, PER_CLASS, N_VAL, seed=0)
    return root


def _listed_wnids(folder: Path) -> list[str]:
    return (folder / "wnids.txt").read_text().split()


def _painted_wnid(image: torch.Tensor, listed: list[str]) -> str:
    """The wnid whose colour ``image`` (3, 64, 64) is painted in (JPEG keeps a flat colour within a few
    levels)."""
    r, g, b = (int(c) for c in image.float().mean((1, 2)).round())
    assert abs(b - 128) <= 3 or b == r
    k = min(range(len(listed)), key=lambda k: abs(tiny_imagenet_colour(k)[0] - r))
    assert abs(tiny_imagenet_colour(k)[0] - r) <= 3
    assert abs(tiny_imagenet_colour(k)[1] - g) <= 3 or g == r  # greyscale images: R = G = B
    return listed[k]


def test_labels_train_from_folders_val_from_annotations(root: Path) -> None:
    folder = root / "tiny-imagenet-200"
    listed = _listed_wnids(folder)
    classes = sorted(listed)
    assert listed != classes  # class index = sorted position, not wnids.txt position
    assert class_names("tiny_imagenet", root, download=False) == classes
    tx, ty, vx, vy = load_cifar("tiny_imagenet", root, download=False)
    assert tx.shape == (CLASSES * PER_CLASS, 3, 64, 64) and vx.shape == (N_VAL, 3, 64, 64)
    assert tx.dtype == vx.dtype == torch.uint8 and ty.dtype == vy.dtype == torch.int64
    assert ty.tolist() == [k for k in range(CLASSES) for _ in range(PER_CLASS)]  # class, then file order
    for x, y in zip(tx, ty, strict=True):
        assert _painted_wnid(x, listed) == classes[y]
    assert torch.equal(tx[0, 0], tx[0, 1]) and torch.equal(tx[0, 0], tx[0, 2])  # greyscale -> RGB
    lines = (folder / "val" / "val_annotations.txt").read_text().splitlines()
    annotated = [line.split("\t")[1] for line in lines]
    assert vy.tolist() == [classes.index(w) for w in annotated]
    assert vy.tolist() != sorted(vy.tolist()) and len(set(vy.tolist())) > 1  # out of order; not all 0
    for i, (x, y) in enumerate(zip(vx, vy, strict=True)):
        assert _painted_wnid(x, listed) == classes[y] == annotated[i]
        jpeg = Image.open(folder / "val" / "images" / f"val_{i}.JPEG").convert("RGB")
        assert torch.equal(x, torch.from_numpy(np.asarray(jpeg)).permute(2, 0, 1))


def test_decoded_images_cached_and_a_changed_folder_noticed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_fake_tiny_imagenet(tmp_path, 3, 2, 4, seed=1)
    first = load_cifar("tiny_imagenet", tmp_path, download=False)
    caches = list(tmp_path.glob("tiny-imagenet-200.uint8-*.npz"))
    assert len(caches) == 1

    decode = tiny._decode
    monkeypatch.setattr(tiny, "_decode", lambda *a: pytest.fail("decoded again despite the cache"))
    again = load_cifar("tiny_imagenet", tmp_path, download=False)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))

    listed = _listed_wnids(folder)
    val0 = folder / "val" / "images" / "val_0.JPEG"
    other = (listed.index(_painted_wnid(first[2][0], listed)) + 1) % 3
    Image.new("RGB", (64, 64), tiny_imagenet_colour(other)).save(val0, "JPEG", quality=95)
    st = val0.stat()
    os.utime(val0, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    monkeypatch.setattr(tiny, "_decode", decode)
    changed = load_cifar("tiny_imagenet", tmp_path, download=False)
    assert _painted_wnid(changed[2][0], listed) == listed[other]
    assert torch.equal(changed[0], first[0]) and torch.equal(changed[3], first[3])
    new_caches = list(tmp_path.glob("tiny-imagenet-200.uint8-*.npz"))
    assert len(new_caches) == 1 and new_caches != caches  # the stale cache is gone


def _error(root: Path, *fragments: str) -> None:
    with pytest.raises(DataError) as e:
        load_cifar("tiny_imagenet", root, download=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("data.root="), msg
    for fragment in fragments:
        assert fragment in msg, msg


def test_layout_errors(tmp_path: Path) -> None:
    _error(tmp_path, "no tiny-imagenet-200/ found", "data.download=false")

    def layout(name: str) -> tuple[Path, Path]:
        folder = write_fake_tiny_imagenet(tmp_path / name, 2, 1, 3, seed=2)
        return tmp_path / name, folder

    r, folder = layout("unannotated")
    annotations = folder / "val" / "val_annotations.txt"
    annotations.write_text("".join(annotations.read_text().splitlines(keepends=True)[:-1]))
    _error(r, "1 image(s) of val/images/", "val_2.JPEG", "no annotation")

    r, folder = layout("unknown_class")
    annotations = folder / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text().replace("\tn", "\tx", 1))
    _error(r, "line 1 of val/val_annotations.txt", "class of wnids.txt")

    r, folder = layout("small_image")
    wnid = _listed_wnids(folder)[0]
    Image.new("RGB", (32, 32)).save(folder / "train" / wnid / "images" / f"{wnid}_0.JPEG", "JPEG")
    _error(r, f"{wnid}_0.JPEG is 32x32, not 64x64")

    r, folder = layout("extra_class")
    (folder / "train" / "n99999999" / "images").mkdir(parents=True)
    _error(r, "class folders of train/", "n99999999")

    r, folder = layout("no_annotations")
    (folder / "val" / "val_annotations.txt").unlink()
    _error(r, "cannot read", "val_annotations.txt", "official Tiny-ImageNet layout")


def test_download_extracts_the_official_zip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline_download: Callable[[Path], list[str]]
) -> None:
    from rift_bn.data import cifar

    write_fake_tiny_imagenet(tmp_path / "src", 2, 2, 2, seed=3)
    archive = Path(shutil.make_archive(str(tmp_path / "tiny-imagenet-200"), "zip", tmp_path / "src"))
    fetched = offline_download(archive)
    with pytest.raises(DataError, match="download failed"):  # not the official bytes: wrong MD5
        load_cifar("tiny_imagenet", tmp_path / "a", download=True)
    assert fetched == ["http://cs231n.stanford.edu/tiny-imagenet-200.zip"]
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    spec = dataclasses.replace(DATASETS["tiny_imagenet"], md5=md5)
    monkeypatch.setitem(cifar.DATASETS, "tiny_imagenet", spec)
    train_x, _, test_x, _ = load_cifar("tiny_imagenet", tmp_path / "b", download=True)
    assert train_x.shape == (4, 3, 64, 64) and test_x.shape == (2, 3, 64, 64)


def test_datamodule_serves_64px_batches(root: Path) -> None:
    spec = DATASETS["tiny_imagenet"]
    assert (spec.num_classes, spec.image_size, spec.pad) == (200, 64, 8)
    assert (spec.mean, spec.std) == (IMAGENET_MEAN, IMAGENET_STD)
    dm = CIFARDataModule("tiny_imagenet", root, val_size=3, download=False, batch_size=4, eval_batch_size=5)
    dm.setup()
    assert dm.num_classes == 200 and len(dm.train_x) == 12 and len(dm.val_x) == 3 and dm.test_size == N_VAL
    assert len(dm.fingerprint) == 16
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 64, 64) and x.dtype == torch.uint8 and y.shape == (4,)
    g = torch.Generator().manual_seed(0)
    xf = augment(to_float(x), g, pad=dm.spec.pad)
    assert xf.shape == (4, 3, 64, 64) and xf.dtype == torch.float32
    _, vy = dm.test_tensors()
    assert torch.equal(vy, load_cifar("tiny_imagenet", root, download=False)[3])
    assert dm.test_accesses == 1


def test_crop_flip_at_64px_with_padding_8() -> None:
    x = torch.rand(2, 3, 64, 64)
    top, left, flip = torch.tensor([0, 16]), torch.tensor([16, 3]), torch.tensor([False, True])
    padded = F.pad(x, (8, 8, 8, 8), mode="reflect")
    out = crop_flip(x, top, left, flip, pad=8)
    assert torch.equal(out[0], padded[0, :, 0:64, 16:80])
    assert torch.equal(out[1], padded[1, :, 16:80, 3:67].flip(-1))
    t, lft, _ = augment_params(2000, generator=torch.Generator().manual_seed(0), pad=8)
    assert int(t.min()) == int(lft.min()) == 0 and int(t.max()) == int(lft.max()) == 16
    # the default (CIFAR) draws are those of before: offsets in [0, 8] from the same generator calls
    g = torch.Generator().manual_seed(1)
    top, left = torch.randint(0, 9, (5,), generator=g), torch.randint(0, 9, (5,), generator=g)
    flip = torch.rand(5, generator=g) < 0.5
    x32 = torch.rand(5, 3, 32, 32)
    assert torch.equal(augment(x32, torch.Generator().manual_seed(1)), crop_flip(x32, top, left, flip))


SMALL_WIDTH = {"resnet18": 4, "preact_resnet18": 4, "wrn34_10": 1}


def _classifier(model: torch.nn.Module) -> torch.nn.Linear:
    return model.net.fc if hasattr(model.net, "fc") else model.net.linear


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_models_at_64px(name: str) -> None:
    torch.manual_seed(0)
    width = SMALL_WIDTH[name]
    m64 = build_model(name, 200, width, image_size=64, mean=IMAGENET_MEAN, std=IMAGENET_STD).eval()
    m32 = build_model(name, 200, width).eval()
    assert torch.allclose(m64.normalize.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    assert torch.allclose(m64.normalize.std.flatten(), torch.tensor(IMAGENET_STD))
    assert torch.allclose(m32.normalize.mean.flatten(), torch.tensor(CIFAR_MEAN))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = m64(x)
        composed = functools.reduce(lambda h, s: s(h), m64.stages(), x)  # MRC's stage-wise path
        assert m32(torch.rand(2, 3, 32, 32)).shape == (2, 200)
        with pytest.raises(RuntimeError):
            m32(x)  # a 32-px classifier does not take 64-px features
    assert out.shape == (2, 200) and torch.equal(composed, out)
    # the 32-px model is as before; at 64 px only the classifier's input grows, by the 2x2 pooled cells
    head32, head64 = _classifier(m32), _classifier(m64)
    channels = 64 * width if name == "wrn34_10" else 8 * width
    assert head32.in_features == channels and head64.in_features == 4 * channels
    sd32, sd64 = m32.state_dict(), m64.state_dict()
    assert list(sd32) == list(sd64)
    assert [k for k in sd32 if sd32[k].shape != sd64[k].shape] == [
        f"net.{'fc' if name == 'wrn34_10' else 'linear'}.weight"
    ]


def test_published_widths_match_rift_at_64px() -> None:
    """RiFT's ``Linear(512 * (64 // 32) ** 2)`` (ResNet-18), ``Linear(640 * (64 // 32) ** 2)`` (WRN-34-10)."""
    assert build_model("resnet18", 200, image_size=64).net.linear.in_features == 2048
    assert build_model("wrn34_10", 200, image_size=64).net.fc.in_features == 2560
    with pytest.raises(ValueError, match="image_size=48: must be a multiple of 32"):
        build_model("resnet18", 200, 4, image_size=48)
