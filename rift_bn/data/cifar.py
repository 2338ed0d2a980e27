"""CIFAR-10/100 and Tiny-ImageNet held in memory as uint8 tensors, with GPU-side augmentation.

Images stay uint8 on the host; :func:`to_float` and :func:`augment` run on the device (the
LightningModules call them from ``on_after_batch_transfer``).
The test split is reachable only through :meth:`CIFARDataModule.test_tensors` and
:meth:`CIFARDataModule.test_dataloader`, which count every access in ``test_accesses``.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rift_bn.errors import UserError
from rift_bn.models import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD
from rift_bn.schema import Dataset

PAD = 4
SIZE = 32

Split = tuple[Tensor, Tensor, Tensor, Tensor]  # train_x, train_y, test_x, test_y


class DataError(UserError):
    """A data problem the user can fix; the message is one line naming the setting and the fix."""


@dataclass(frozen=True)
class CIFARSpec:
    """A data set: where its official layout is stored and downloaded from, how it is read, and what a
    model and the augmentation need to know about its images.

    ``read(folder)`` returns ``(train_x, train_y, test_x, test_y)`` (uint8 ``(N, 3, image_size,
    image_size)``, int64 labels) from the extracted ``folder``; ``class_names(folder)`` the names of
    classes ``0..num_classes-1``. ``pad`` is the reflect padding of the random crop (RiFT: 4 for CIFAR,
    8 for Tiny-ImageNet); ``mean``/``std`` the normalisation of :class:`rift_bn.models.NormalizedModel`.
    """

    folder: str
    url: str
    md5: str
    num_classes: int
    title: str
    read: Callable[[Path], Split]
    class_names: Callable[[Path], list[str]]
    image_size: int = SIZE
    pad: int = PAD
    mean: tuple[float, float, float] = CIFAR_MEAN
    std: tuple[float, float, float] = CIFAR_STD


def _read_tiny_imagenet(folder: Path) -> Split:
    from rift_bn.data.tiny_imagenet import read_tiny_imagenet  # imports this module (DataError)

    return read_tiny_imagenet(folder)


def _tiny_imagenet_classes(folder: Path) -> list[str]:
    from rift_bn.data.tiny_imagenet import tiny_imagenet_classes

    return tiny_imagenet_classes(folder)


def _read_cifar(
    folder: Path, train_files: tuple[str, ...], test_files: tuple[str, ...], label_key: str
) -> Split:
    """An official CIFAR python layout: the pickles ``train_files`` and ``test_files`` under ``folder``."""
    return (*_read_files(folder, train_files, label_key), *_read_files(folder, test_files, label_key))


def _pickled_names(folder: Path, file: str, key: str) -> list[str]:
    """The class names under ``key`` in the pickle ``folder/file`` (CIFAR's ``batches.meta``, ``meta``)."""
    path = folder / file
    try:
        with open(path, "rb") as f:
            names = _get(pickle.load(f, encoding="bytes"), key)
        return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError) as e:
        raise DataError(
            f"data.root={folder.parent}: cannot read the class names from {path} ({type(e).__name__}: {e}); "
            f"replace {folder.name}/ with the official layout"
        ) from None


DATASETS: dict[Dataset, CIFARSpec] = {
    Dataset.cifar10: CIFARSpec(
        folder="cifar-10-batches-py",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        num_classes=10,
        title="CIFAR-10",
        read=partial(
            _read_cifar,
            train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
            test_files=("test_batch",),
            label_key="labels",
        ),
        class_names=partial(_pickled_names, file="batches.meta", key="label_names"),
    ),
    Dataset.cifar100: CIFARSpec(
        folder="cifar-100-python",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        num_classes=100,
        title="CIFAR-100",
        read=partial(_read_cifar, train_files=("train",), test_files=("test",), label_key="fine_labels"),
        class_names=partial(_pickled_names, file="meta", key="fine_label_names"),
    ),
    # The official zip's MD5, as avalanche, continuum and other loaders check it (torchvision has no
    # Tiny-ImageNet); the test split is the official validation set (the official test set has no labels).
    Dataset.tiny_imagenet: CIFARSpec(
        folder="tiny-imagenet-200",
        url="http://cs231n.stanford.edu/tiny-imagenet-200.zip",
        md5="90528d7ca1a48142e341f4ef8d21d0de",
        num_classes=200,
        title="Tiny-ImageNet",
        read=_read_tiny_imagenet,
        class_names=_tiny_imagenet_classes,
        image_size=64,
        pad=8,  # RiFT/main.py: RandomCrop(64, padding=8, padding_mode="reflect")
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    ),
}


def _spec(name: str) -> CIFARSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(
            f"data.name={name!r}: unknown data set; choose one of {', '.join(sorted(DATASETS))} "
            f"(e.g. data=cifar10)"
        ) from None


# --------------------------------------------------------------------------- loading


def _get(d: dict[Any, Any], key: str) -> Any:
    """``d[key]`` for pickles read with either str or bytes keys."""
    if key in d:
        return d[key]
    bkey = key.encode()
    if bkey in d:
        return d[bkey]
    raise KeyError(key)


def _read_files(folder: Path, files: tuple[str, ...], label_key: str) -> tuple[Tensor, Tensor]:
    xs, ys = [], []
    for fname in files:
        path = folder / fname
        try:
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            data = np.asarray(_get(d, "data"), dtype=np.uint8).reshape(-1, 3, SIZE, SIZE)
            labels = np.asarray(_get(d, label_key), dtype=np.int64).reshape(-1)
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError) as e:
            raise DataError(
                f"data.root={folder.parent}: cannot read {path} ({type(e).__name__}: {e}); "
                f"replace {folder.name}/ with the official python layout"
            ) from None
        if len(data) != len(labels):
            raise DataError(
                f"data.root={folder.parent}: {path} has {len(data)} images but {len(labels)} labels; "
                f"replace {folder.name}/ with the official python layout"
            )
        xs.append(torch.from_numpy(np.ascontiguousarray(data)))
        ys.append(torch.from_numpy(labels))
    return torch.cat(xs), torch.cat(ys)


def _download(spec: CIFARSpec, root: Path, timeout: float = 20.0) -> None:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(spec.url, str(root), md5=spec.md5)
    except Exception as e:
        raise DataError(
            f"data.root={root}: no {spec.folder}/ found and the download failed (offline? "
            f"{type(e).__name__}); put the official {spec.title} layout there, "
            f"or set RIFT_BN_DATA / data.root to where it is"
        ) from None
    finally:
        socket.setdefaulttimeout(old)
    if not (root / spec.folder).is_dir():
        raise DataError(
            f"data.root={root}: the download did not produce {spec.folder}/; put the official "
            f"{spec.title} layout there, or set RIFT_BN_DATA / data.root to where it is"
        )


def ensure_cifar(name: str, root: str | Path, download: bool = True) -> Path:
    """Return ``root/<folder>``, downloading the official archive first if it is missing."""
    spec = _spec(name)
    root = Path(root).expanduser().resolve()
    folder = root / spec.folder
    if folder.is_dir():
        return folder
    if not download:
        raise DataError(
            f"data.root={root}: no {spec.folder}/ found and data.download=false; put the official "
            f"{spec.title} layout there, set RIFT_BN_DATA / data.root to where it is, "
            f"or set data.download=true"
        )
    _download(spec, root)
    return folder


def load_cifar(name: str, root: str | Path, download: bool = True) -> Split:
    """Load data set ``name`` (any of :data:`DATASETS`) as ``(train_x, train_y, test_x, test_y)``: uint8
    ``(N, 3, S, S)`` images (S = its ``image_size``), int64 labels.

    Reads the official layout under ``root/<folder>`` as it is (no checksum of the extracted files);
    downloads the official archive (checksum verified) only when the folder is missing.
    """
    spec = _spec(name)
    folder = ensure_cifar(name, root, download)
    train_x, train_y, test_x, test_y = spec.read(folder)
    for y in (train_y, test_y):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= spec.num_classes):
            raise DataError(
                f"data.root={folder.parent}: labels in {folder.name}/ fall outside "
                f"0..{spec.num_classes - 1}; is this {spec.title}? check data.name"
            )
    return train_x, train_y, test_x, test_y


def class_names(name: str, root: str | Path, download: bool = True) -> list[str]:
    """The names of data set ``name``'s classes in label order (CIFAR: its meta pickle; Tiny-ImageNet:
    the sorted WordNet ids)."""
    spec = _spec(name)
    return spec.class_names(ensure_cifar(name, root, download))


def split_indices(n: int, val_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded split of ``range(n)`` into ``(val_idx, train_idx)``: the first ``val_size`` of a permutation."""
    if not 0 <= val_size < n:
        raise DataError(f"data.val_size={val_size}: must be in [0, {n}) for {n} training images")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:val_size], perm[val_size:]


SELECTION_SOURCES = ("train_holdout", "test_half")


def fingerprint(*tensors: Tensor) -> str:
    """A short SHA-256 of tensors' shapes, dtypes and bytes: which data a result was computed on."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- device-side transforms


def to_float(x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 images -> float in [0, 1]."""
    if x.dtype != torch.uint8:
        raise TypeError(f"to_float expects uint8 images, got {x.dtype} (already converted?)")
    return x.to(dtype).div_(255)


def augment_params(
    n: int,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    pad: int = PAD,
) -> tuple[Tensor, Tensor, Tensor]:
    """Draw per-image ``(top, left, flip)``: crop offsets in ``[0, 2*pad]`` and flip flags (p=0.5)."""
    gdev = generator.device if generator is not None else device
    top = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gdev)
    left = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gdev)
    flip = torch.rand(n, generator=generator, device=gdev) < 0.5
    return top.to(device), left.to(device), flip.to(device)


def crop_flip(x: Tensor, top: Tensor, left: Tensor, flip: Tensor, pad: int = PAD) -> Tensor:
    """Crop ``x`` (N,C,H,W) at ``(top, left)`` of its ``pad``-pixel reflect padding; flip where ``flip``."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = top[:, None] + ar_h  # (N,H)
    cols = left[:, None] + torch.where(flip[:, None], ar_w.flip(0), ar_w)  # (N,W)
    n_idx = torch.arange(n, device=x.device)[:, None, None, None]
    c_idx = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[n_idx, c_idx, rows[:, None, :, None], cols[:, None, None, :]]


def augment(x: Tensor, generator: torch.Generator | None = None, pad: int = PAD) -> Tensor:
    """Random crop of the input's size after ``pad``-pixel reflect padding plus random horizontal flip,
    for a whole batch (``pad``: the data set's ``CIFARSpec.pad``, 4 for CIFAR, 8 for Tiny-ImageNet)."""
    if x.shape[0] == 0:
        return x.clone()
    return crop_flip(x, *augment_params(x.shape[0], x.device, generator, pad), pad)


# --------------------------------------------------------------------------- loader


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class TensorLoader:
    """Batches ``(x[idx], y[idx])`` of in-memory tensors; shards by rank under torch.distributed.

    With ``shuffle`` each epoch uses the permutation seeded by ``seed + epoch``. The epoch is the one
    given to :meth:`set_epoch` if it was called, else ``epoch_fn()`` if given and not None, else an
    internal counter that advances on each ``__iter__``. Under a world of size W > 1 (or the
    ``rank``/``world_size`` overrides) each rank takes the strided shard ``idx[rank::W]`` of the
    (permuted) indices. With ``pad`` (training) the indices are first padded by wrapping so that all
    ranks get the same number of batches (DDP's gradient all-reduce needs equal step counts); without it
    (evaluation) the shards are disjoint and together hold every index exactly once, so a metric summed
    over the ranks counts each image once; the ranks' batch counts may then differ by one. With
    ``global_batch`` the batch size is that of the whole world: each rank takes ``batch_size / W`` of
    its shard per step, so that the W ranks of a step together hold the single-process batch.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        epoch_fn: Callable[[], int | None] | None = None,
        global_batch: bool = False,
        pad: bool = True,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length ({len(x)} vs {len(y)})")
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size}: must be >= 1 (data.batch_size / data.eval_batch_size)")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:  # type: ignore[operator]
            raise ValueError(f"rank={rank} outside world_size={world_size}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch_fn = epoch_fn
        self.global_batch = global_batch
        self.pad = pad
        self._counter = 0
        self._epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for every following ``__iter__`` (until called again)."""
        self._epoch = epoch

    def _world(self) -> tuple[int, int]:
        if self.world_size is not None:
            return self.rank, self.world_size  # type: ignore[return-value]
        return _dist_info()

    def _per_rank(self, rank: int, world: int) -> int:
        """How many indices ``rank`` holds: ``ceil(n / world)`` each when padded, else its strided share."""
        n = len(self.x)
        if self.pad:
            return math.ceil(n / world) if n else 0
        if 0 < n < world:  # a rank without a batch stops Lightning's DDP; padding would count images twice
            raise DataError(
                f"{n} evaluation image(s) for {world} processes: every process needs one; use at least "
                f"{world} selection images (data.val_size) or fewer processes (trainer.devices)"
            )
        return len(range(rank, n, world))

    def rank_batch(self) -> int:
        """This rank's batch size: ``batch_size``, or its share of it with ``global_batch``."""
        world = self._world()[1]
        if not self.global_batch or world == 1:
            return self.batch_size
        if self.batch_size % world:
            raise DataError(
                f"batch_size={self.batch_size}: does not split evenly among {world} processes; choose "
                f"at.batch_size / finetune.batch_size divisible by trainer.devices x trainer.num_nodes"
            )
        return self.batch_size // world

    def __len__(self) -> int:
        m, bs = self._per_rank(*self._world()), self.rank_batch()
        return m // bs if self.drop_last else math.ceil(m / bs)

    def _next_epoch(self) -> int:
        if self._epoch is not None:
            return self._epoch
        if self.epoch_fn is not None and (e := self.epoch_fn()) is not None:
            return int(e)
        e, self._counter = self._counter, self._counter + 1
        return e

    def indices(self, epoch: int | None = None) -> Tensor | None:
        """This rank's indices for ``epoch`` (None: in order, everything, no copy needed)."""
        n = len(self.x)
        rank, world = self._world()
        if not self.shuffle and world == 1:
            return None
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + (epoch or 0))
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        if world > 1 and n:
            if self.pad and (total := self._per_rank(rank, world) * world) > n:
                idx = idx.repeat(math.ceil(total / n))[:total]
            idx = idx[rank::world]
        return idx

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch = self._next_epoch()
        idx = self.indices(epoch)
        bs, nb = self.rank_batch(), len(self)
        for b in range(nb):
            if idx is None:
                yield self.x[b * bs : (b + 1) * bs], self.y[b * bs : (b + 1) * bs]
            else:
                i = idx[b * bs : (b + 1) * bs]
                yield self.x[i], self.y[i]


# --------------------------------------------------------------------------- datamodule


class CIFARDataModule(lightning.LightningDataModule):
    """A data set of :data:`DATASETS` (CIFAR-10/100, Tiny-ImageNet) in memory: a seeded selection split
    (``val``) carved from the official training set. ``spec`` holds its image size, crop padding and
    normalisation.

    The test split is private; use :meth:`test_tensors` / :meth:`test_dataloader`, which increment
    ``test_accesses``.
    """

    @classmethod
    def from_config(cls, cfg) -> CIFARDataModule:
        """The data module a job's config describes (``data``, ``seed``, ``at.batch_size``,
        ``eval.batch_size``): the one constructor the pipeline and the tools use."""
        d = cfg.data
        return cls(
            d.name,
            d.root,
            d.val_size,
            d.train_subset,
            d.test_subset,
            batch_size=cfg.at.batch_size,
            eval_batch_size=cfg.eval.batch_size,
            seed=cfg.seed,
            download=d.download,
            selection_source=d.selection_source,
        )

    def __init__(
        self,
        name: str = "cifar10",
        root: str | Path = "data",
        val_size: int = 1000,
        train_subset: int | None = None,
        test_subset: int | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 500,
        seed: int = 0,
        download: bool = True,
        selection_source: str = "train_holdout",
    ) -> None:
        super().__init__()
        self.spec = _spec(name)
        if selection_source not in SELECTION_SOURCES:
            raise DataError(
                f"data.selection_source={selection_source}: unknown; "
                f"choose one of {', '.join(SELECTION_SOURCES)}"
            )
        self.selection_source = selection_source
        for key, val in (("train_subset", train_subset), ("test_subset", test_subset)):
            if val is not None and val < 1:
                raise DataError(f"data.{key}={val}: must be >= 1, or null for everything")
        for key, val in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if val < 1:
                raise DataError(f"data.{key}={val}: must be >= 1")
        self.name = name
        self.root = root
        self.val_size = val_size
        self.train_subset = train_subset
        self.test_subset = test_subset
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.download = download
        self.num_classes = self.spec.num_classes
        self.test_accesses = 0
        self.fingerprint = ""  # set by setup(): hash of every image and label a run can use
        self._loaded = False
        self.train_x: Tensor
        self.train_y: Tensor
        self.val_x: Tensor
        self.val_y: Tensor
        self._test_x: Tensor
        self._test_y: Tensor

    def prepare_data(self) -> None:
        """Download if missing (Lightning runs this on one process before ``setup``)."""
        ensure_cifar(self.name, self.root, self.download)

    def setup(self, stage: str | None = None) -> None:
        """Load and split once; later calls do nothing.

        ``train_holdout``: the selection split (``val``) is a seeded ``val_size`` images of the training
        set, held out of training. ``test_half``: the (subset of the) test set is split by a seeded
        permutation; its first half selects (``val``), the disjoint second half is the reported test
        split, and training uses the whole training set (``val_size`` is not used).
        """
        if self._loaded:
            return
        train_x, train_y, test_x, test_y = load_cifar(self.name, self.root, self.download)
        test_index = torch.arange(len(test_y))
        if self.test_subset is not None:
            test_x, test_y = test_x[: self.test_subset], test_y[: self.test_subset]
            test_index = test_index[: self.test_subset]
        if self.selection_source == "test_half":
            if len(test_x) < 2:
                raise DataError(
                    f"data.test_subset={self.test_subset}: data.selection_source=test_half needs at "
                    "least 2 test images; raise data.test_subset"
                )
            perm = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(self.seed))
            sel, rep = perm[: len(test_x) // 2], perm[len(test_x) // 2 :].sort().values
            self.val_x, self.val_y = test_x[sel], test_y[sel]
            test_x, test_y, test_index = test_x[rep], test_y[rep], test_index[rep]
            train_idx = torch.arange(len(train_x))
        else:
            val_idx, train_idx = split_indices(len(train_x), self.val_size, self.seed)
            self.val_x, self.val_y = train_x[val_idx], train_y[val_idx]
        if self.train_subset is not None:
            train_idx = train_idx[: self.train_subset]
        self.train_x, self.train_y = train_x[train_idx], train_y[train_idx]
        self._test_x, self._test_y = test_x, test_y
        self.test_index = test_index  # positions in the official test set of the reported images
        self.fingerprint = fingerprint(
            self.train_x, self.train_y, self.val_x, self.val_y, self._test_x, self._test_y
        )
        self._loaded = True

    def _require_setup(self) -> None:
        if not self._loaded:
            raise RuntimeError("CIFARDataModule.setup() must run before the data is used")

    def _trainer_epoch(self) -> int | None:
        trainer = getattr(self, "trainer", None)
        return None if trainer is None else int(trainer.current_epoch)

    def train_dataloader(self) -> TensorLoader:
        self._require_setup()
        return TensorLoader(
            self.train_x,
            self.train_y,
            self.batch_size,
            shuffle=True,
            seed=self.seed,
            epoch_fn=self._trainer_epoch,
            global_batch=True,  # DDP: the recipe's batch of 128 is the whole step's, not each process's
        )

    def val_dataloader(self) -> TensorLoader:
        self._require_setup()
        # unpadded shards: under DDP the ranks' validation metrics, summed, count each image exactly once
        return TensorLoader(self.val_x, self.val_y, self.eval_batch_size, pad=False)

    @property
    def test_size(self) -> int:
        """How many test images the run reports on (not a read of the test split)."""
        self._require_setup()
        return len(self._test_y)

    def test_tensors(self) -> tuple[Tensor, Tensor]:
        """The test split ``(x_uint8, y)``; counted in ``test_accesses``."""
        self._require_setup()
        self.test_accesses += 1
        return self._test_x, self._test_y

    def test_dataloader(self) -> TensorLoader:
        """Unshuffled loader over the test split; counted in ``test_accesses``."""
        x, y = self.test_tensors()
        return TensorLoader(x, y, self.eval_batch_size)
