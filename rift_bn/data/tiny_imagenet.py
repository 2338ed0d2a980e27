"""Tiny-ImageNet-200 read from its official layout into uint8 tensors, the decoded arrays cached beside it.

Layout (``tiny-imagenet-200/`` of http://cs231n.stanford.edu/tiny-imagenet-200.zip): ``wnids.txt`` (the
200 WordNet ids), ``train/<wnid>/images/*.JPEG`` (500 per class), ``val/images/*.JPEG`` (10,000) whose
classes are listed in ``val/val_annotations.txt`` (tab-separated: file name, wnid, bounding box); 64x64,
RGB or greyscale (converted to RGB). The official ``test/`` has no labels and is not read.

Class index = position of the wnid in ``sorted(wnids)``: the order torchvision's ``ImageFolder`` gives
``train/`` (RiFT's loader, ``RiFT/dataloader.py:TinyImageNet``), so RiFT's Tiny-ImageNet checkpoints keep
their classes. Training images are in class order, then file-name order; validation images (the test split
here) in the order of ``val_annotations.txt``, each labelled from it. An ``ImageFolder`` over ``val/`` (as
in RiFT's code) instead sees one class, ``images``, and labels every validation image 0
(microsoft/robustlearn issue #59).

Decoding 110,000 JPEGs takes a while, so the arrays are cached as
``<root>/tiny-imagenet-200.uint8-<key>.npz`` (about 1.3 GB), where ``key`` hashes ``wnids.txt``,
``val_annotations.txt`` and every image's path, size and modification time: a changed folder is decoded
again (and the stale cache removed). A read-only ``root`` just goes without the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rift_bn.data.cifar import DataError, Split

SIZE = 64
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
CACHE_VERSION = "rift_bn tiny-imagenet uint8 v1"
JPEG_SUFFIXES = (".jpeg", ".jpg")

log = logging.getLogger(__name__)


def _error(folder: Path, problem: str) -> DataError:
    return DataError(
        f"data.root={folder.parent}: {problem}; replace {folder.name}/ with the official Tiny-ImageNet "
        f"layout ({URL})"
    )


def _read_text(folder: Path, rel: str) -> str:
    try:
        return (folder / rel).read_text()
    except OSError as e:
        raise _error(folder, f"cannot read {folder / rel} ({type(e).__name__})") from None


def tiny_imagenet_classes(folder: Path) -> list[str]:
    """The wnids of ``folder/wnids.txt``, sorted: class ``i`` is the ``i``-th."""
    wnids = _read_text(folder, "wnids.txt").split()
    if not wnids or len(set(wnids)) != len(wnids):
        raise _error(folder, f"{folder / 'wnids.txt'} lists no class, or a class twice")
    return sorted(wnids)


def _jpegs(folder: Path, rel: str) -> list[os.DirEntry]:
    """The JPEG entries of ``folder/rel``, by file name."""
    try:
        with os.scandir(folder / rel) as it:
            entries = [e for e in it if e.is_file() and Path(e.name).suffix.lower() in JPEG_SUFFIXES]
    except OSError as e:
        raise _error(folder, f"cannot list {folder / rel} ({type(e).__name__})") from None
    return sorted(entries, key=lambda e: e.name)


def _listing(folder: Path) -> tuple[list[os.DirEntry], list[int], list[os.DirEntry], list[int]]:
    """``(train entries, train labels, val entries, val labels)`` of the layout, checked."""
    classes = tiny_imagenet_classes(folder)
    index = {wnid: i for i, wnid in enumerate(classes)}
    try:
        folders = {p.name for p in (folder / "train").iterdir() if p.is_dir()}
    except OSError as e:
        raise _error(folder, f"cannot list {folder / 'train'} ({type(e).__name__})") from None
    if folders != set(classes):
        odd = sorted(folders ^ set(classes))[:3]
        raise _error(folder, f"the class folders of train/ and the wnids of wnids.txt differ (e.g. {odd})")
    train, train_y = [], []
    for wnid in classes:
        entries = _jpegs(folder, f"train/{wnid}/images")
        if not entries:
            raise _error(folder, f"train/{wnid}/images/ holds no JPEG")
        train += entries
        train_y += [index[wnid]] * len(entries)
    by_name = {e.name: e for e in _jpegs(folder, "val/images")}
    val, val_y = [], []
    for n, line in enumerate(_read_text(folder, "val/val_annotations.txt").splitlines(), start=1):
        if not line.strip():
            continue
        name, wnid = (line.split("\t") + [""])[:2]
        if name not in by_name or wnid not in index:
            raise _error(
                folder,
                f"line {n} of val/val_annotations.txt ({line.strip()[:60]!r}) does not name an image of "
                "val/images/ (once) and a class of wnids.txt",
            )
        val.append(by_name.pop(name))
        val_y.append(index[wnid])
    if by_name:
        raise _error(
            folder, f"{len(by_name)} image(s) of val/images/ (e.g. {min(by_name)}) have no annotation"
        )
    return train, train_y, val, val_y


def _cache_path(folder: Path, entries: list[os.DirEntry]) -> Path:
    """Where the decoded arrays of this exact folder are cached (the key changes with any image)."""
    h = hashlib.sha256(CACHE_VERSION.encode())
    for rel in ("wnids.txt", "val/val_annotations.txt"):
        h.update(_read_text(folder, rel).encode())
    for e in entries:
        st = e.stat()
        h.update(f"{os.path.relpath(e.path, folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return folder.parent / f"{folder.name}.uint8-{h.hexdigest()[:16]}.npz"


def _decode(folder: Path, entries: list[os.DirEntry]) -> np.ndarray:
    """The images as uint8 ``(N, 3, 64, 64)``."""
    out = np.empty((len(entries), 3, SIZE, SIZE), dtype=np.uint8)
    for i, e in enumerate(entries):
        try:
            with Image.open(e.path) as im:
                arr = np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as err:
            raise _error(folder, f"cannot decode {e.path} ({type(err).__name__}: {err})") from None
        if arr.shape != (SIZE, SIZE, 3):
            raise _error(folder, f"{e.path} is {arr.shape[1]}x{arr.shape[0]}, not {SIZE}x{SIZE}")
        out[i] = arr.transpose(2, 0, 1)
    return out


KEYS = ("train_x", "train_y", "test_x", "test_y")


def _load_cache(path: Path) -> Split | None:
    try:
        with np.load(path) as z:
            return tuple(torch.from_numpy(z[k]) for k in KEYS)  # type: ignore[return-value]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # absent or unreadable (e.g. a write cut short): decode again


def _save_cache(path: Path, arrays: Split) -> None:
    """Write ``arrays`` to ``path`` atomically and remove the caches of older versions of the folder."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **{k: a.numpy() for k, a in zip(KEYS, arrays, strict=True)})
        os.replace(tmp, path)
        for old in path.parent.glob(f"{path.name.split('.uint8-')[0]}.uint8-*.npz"):
            if old != path:
                old.unlink()
    except OSError as e:
        tmp.unlink(missing_ok=True)
        log.warning("Tiny-ImageNet: not caching the decoded images at %s (%s: %s)", path, type(e).__name__, e)


def read_tiny_imagenet(folder: str | Path) -> Split:
    """``(train_x, train_y, test_x, test_y)`` of the official layout at ``folder`` (``tiny-imagenet-200/``):
    uint8 ``(N, 3, 64, 64)`` images, int64 labels; the test split is the official validation set."""
    folder = Path(folder)
    train, train_y, val, val_y = _listing(folder)
    cache = _cache_path(folder, train + val)
    cached = _load_cache(cache)
    if cached is not None:
        return cached
    arrays: Split = (
        torch.from_numpy(_decode(folder, train)),
        torch.tensor(train_y, dtype=torch.int64),
        torch.from_numpy(_decode(folder, val)),
        torch.tensor(val_y, dtype=torch.int64),
    )
    _save_cache(cache, arrays)
    return arrays
