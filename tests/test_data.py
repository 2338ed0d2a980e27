"""rift_bn.data: CIFAR loading, selection split, device-side augmentation, TensorLoader, DataModule."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rift_bn.data import (
    DATASETS,
    CIFARDataModule,
    DataError,
    TensorLoader,
    augment,
    augment_params,
    crop_flip,
    load_cifar,
    split_indices,
    to_float,
)
from tests.conftest import cifar_layout, dump_pickle, signature_ids, write_fake_cifar10


@pytest.fixture(scope="module")
def cifar10_jpeg_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cifar_layout(tmp_path_factory, 300, 100)


# --------------------------------------------------------------------------- (a) real CIFAR-10 layout


def test_load_cifar10_real_layout(cifar10_jpeg_root: Path) -> None:
    tx, ty, vx, vy = load_cifar("cifar10", cifar10_jpeg_root, download=False)
    assert tx.shape == (300, 3, 32, 32) and vx.shape == (100, 3, 32, 32)
    assert tx.dtype == vx.dtype == torch.uint8
    assert ty.dtype == vy.dtype == torch.int64 and ty.shape == (300,) and vy.shape == (100,)
    assert int(ty.min()) >= 0 and int(ty.max()) <= 9 and len(ty.unique()) == 10
    folder = cifar10_jpeg_root / "cifar-10-batches-py"
    with open(folder / "data_batch_1", "rb") as f:
        d = pickle.load(f, encoding="latin1")
    n1 = len(d["labels"])
    assert torch.equal(tx[:n1], torch.from_numpy(d["data"]).reshape(-1, 3, 32, 32))
    assert ty[:n1].tolist() == d["labels"]
    with open(folder / "test_batch", "rb") as f:
        d = pickle.load(f, encoding="latin1")
    # pixel (row 5, col 7) of test image 3 in each colour plane
    for c in range(3):
        assert int(vx[3, c, 5, 7]) == int(d["data"][3, c * 1024 + 5 * 32 + 7])
    assert vy.tolist() == d["labels"]


def test_datamodule_on_real_layout(cifar10_jpeg_root: Path) -> None:
    dm = CIFARDataModule(root=cifar10_jpeg_root, val_size=50, test_subset=20, download=False, batch_size=64)
    dm.setup()
    assert len(dm.train_x) == 250 and len(dm.val_x) == 50 and dm.num_classes == 10
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (64, 3, 32, 32) and y.shape == (64,)
    xf, yf = augment(to_float(x), torch.Generator().manual_seed(0)), y
    assert xf.dtype == torch.float32 and float(xf.min()) >= 0 and float(xf.max()) <= 1 and yf is y
    assert dm.test_accesses == 0


# --------------------------------------------------------------------------- (b) CIFAR-100 official format


def test_load_cifar100_own_files(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 30), ("test", 12)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n)
        fine[:2] = [0, 99]
        data[0, :1024], data[0, 1024:2048], data[0, 2048:] = 10, 20, 30  # R, G, B planes
        data[1, 5 * 32 + 7] = 201  # R at row 5, col 7
        data[1, 1024 + 31 * 32 + 0] = 202  # G at row 31, col 0
        data[1, 2048 + 0 * 32 + 31] = 203  # B at row 0, col 31
        dump_pickle(
            folder / split,
            {
                b"data": data,
                b"fine_labels": fine.tolist(),
                b"coarse_labels": (fine // 5).tolist(),
                b"filenames": [f"{split}_{i}.png".encode() for i in range(n)],
                b"batch_label": split.encode(),
            },
        )
        splits[split] = (data, fine)
    dump_pickle(
        folder / "meta", {b"fine_label_names": [b"c%d" % i for i in range(100)], b"coarse_label_names": []}
    )

    tx, ty, vx, vy = load_cifar("cifar100", tmp_path, download=False)
    assert DATASETS["cifar100"].num_classes == 100
    for x, y, (data, fine) in ((tx, ty, splits["train"]), (vx, vy, splits["test"])):
        assert x.shape == (len(fine), 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
        assert torch.equal(x, torch.from_numpy(data.reshape(-1, 3, 32, 32)))
        assert y.tolist() == fine.tolist()
        assert x[0, 0].unique().tolist() == [10] and x[0, 1].unique().tolist() == [20]
        assert x[0, 2].unique().tolist() == [30]
        assert int(x[1, 0, 5, 7]) == 201 and int(x[1, 1, 31, 0]) == 202 and int(x[1, 2, 0, 31]) == 203
    dm = CIFARDataModule("cifar100", root=tmp_path, val_size=5, download=False)
    dm.setup()
    assert dm.num_classes == 100 and len(dm.train_x) == 25


# --------------------------------------------------------------------------- (c) splits


def test_split_indices() -> None:
    val, train = split_indices(100, 10, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert sorted(torch.cat([val, train]).tolist()) == list(range(100))
    v2, t2 = split_indices(100, 10, seed=3)
    assert torch.equal(val, v2) and torch.equal(train, t2)
    v3, _ = split_indices(100, 10, seed=4)
    assert not torch.equal(val, v3)
    assert len(split_indices(5, 0, 0)[0]) == 0
    for bad in (-1, 100):
        with pytest.raises(DataError, match="data.val_size"):
            split_indices(100, bad, 0)


def test_datamodule_splits_disjoint(tmp_path: Path) -> None:
    root = write_fake_cifar10(tmp_path)
    dm = CIFARDataModule(root=root, val_size=50, train_subset=120, test_subset=30, seed=1, download=False)
    dm.setup()
    train_ids, val_ids = signature_ids(dm.train_x), signature_ids(dm.val_x)
    assert len(train_ids) == 120 and len(val_ids) == 50 and not train_ids & val_ids
    assert (dm.train_x[:, 1, 0, 0] == 0).all() and (dm.val_x[:, 1, 0, 0] == 0).all()
    assert dm.train_y.tolist() == [
        i % 10 for i in (dm.train_x[:, 0, 0, 0] + 256 * dm.train_x[:, 0, 0, 1]).tolist()
    ]
    test_x, test_y = dm.test_tensors()
    assert (
        len(test_x) == 30
        and (test_x[:, 1, 0, 0] == 1).all()
        and sorted(signature_ids(test_x)) == list(range(30))
    )
    # the full training split: val + train cover all 250 training images
    full = CIFARDataModule(root=root, val_size=50, seed=1, download=False)
    full.setup()
    assert signature_ids(full.val_x) == val_ids and signature_ids(full.train_x) | val_ids == set(range(250))
    assert train_ids <= signature_ids(full.train_x)
    other = CIFARDataModule(root=root, val_size=50, seed=2, download=False)
    other.setup()
    assert signature_ids(other.val_x) != val_ids


# --------------------------------------------------------------------------- (d) augmentation


def _candidates(img: torch.Tensor) -> list[torch.Tensor]:
    padded = F.pad(img[None], (4, 4, 4, 4), mode="reflect")[0]
    out = []
    for t in range(9):
        for s in range(9):
            crop = padded[:, t : t + 32, s : s + 32]
            out += [crop, crop.flip(-1)]
    return out


def test_augment_is_crop_and_flip() -> None:
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = augment(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert sum(not torch.equal(o, i) for o, i in zip(out, x, strict=True)) >= 8
    for o, i in zip(out, x, strict=True):
        assert sum(torch.equal(o, c) for c in _candidates(i)) == 1
    # the same generator seed gives the same batch
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(1)))
    # both flips and several offsets occur
    top, left, flip = augment_params(256, generator=torch.Generator().manual_seed(2))
    assert 0 < int(flip.sum()) < 256 and set(top.tolist()) == set(range(9)) and int(left.max()) == 8
    assert augment(x, None).shape == x.shape and augment(x[:0]).shape == (0, 3, 32, 32)
    assert augment(x.half(), torch.Generator().manual_seed(0)).dtype == torch.float16


def test_crop_flip_reference() -> None:
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    top, left, flip = torch.tensor([0, 8, 3]), torch.tensor([8, 0, 5]), torch.tensor([False, True, False])
    out = crop_flip(x, top, left, flip)
    ref = F.pad(x, (4, 4, 4, 4), mode="reflect")
    assert torch.equal(out[0], ref[0, :, 0:32, 8:40])
    assert torch.equal(out[1], ref[1, :, 8:40, 0:32].flip(-1))
    assert torch.equal(out[2], ref[2, :, 3:35, 5:37])
    # offset (4, 4) unflipped is the identity; the reflect border mirrors without repeating the edge
    four = torch.tensor([4] * 3)
    assert torch.equal(crop_flip(x, four, four, torch.zeros(3, dtype=torch.bool)), x)
    shifted = crop_flip(x, torch.tensor([4]), torch.tensor([5]), torch.tensor([False]))[0]  # 1 pixel right
    assert torch.equal(shifted[:, :, :31], x[0, :, :, 1:]) and torch.equal(shifted[:, :, 31], x[0, :, :, 30])


def test_to_float() -> None:
    x = torch.tensor([[0, 51, 255]], dtype=torch.uint8)
    assert torch.allclose(to_float(x), torch.tensor([[0.0, 0.2, 1.0]]))
    assert to_float(x, torch.float64).dtype == torch.float64
    with pytest.raises(TypeError):
        to_float(x.float())


# --------------------------------------------------------------------------- (e) errors


def test_download_is_checksum_verified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline_download: Callable[[Path], list[str]]
) -> None:
    """The official tarball is fetched and checked against its MD5 before extraction (torchvision's
    download path, network replaced by a local copy): a tarball that is not the official one is refused."""
    import dataclasses
    import hashlib
    import tarfile

    from rift_bn.data import cifar

    src = write_fake_cifar10(tmp_path / "src")
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    fetched = offline_download(tarball)
    with pytest.raises(DataError, match="download failed"):  # not the official bytes: wrong MD5
        load_cifar("cifar10", tmp_path / "a", download=True)
    assert (
        fetched == [cifar.DATASETS["cifar10"].url] and not (tmp_path / "a" / "cifar-10-batches-py").exists()
    )
    md5 = hashlib.md5(tarball.read_bytes()).hexdigest()  # the same bytes, declared: accepted and read
    monkeypatch.setitem(cifar.DATASETS, "cifar10", dataclasses.replace(cifar.DATASETS["cifar10"], md5=md5))
    train_x, train_y, test_x, _ = load_cifar("cifar10", tmp_path / "b", download=True)
    assert (len(train_x), len(test_x)) == (250, 40) and train_x.dtype == torch.uint8


def test_missing_layout_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="data.root") as e:
        load_cifar("cifar10", tmp_path, download=False)
    msg = str(e.value)
    assert "\n" not in msg and "cifar-10-batches-py" in msg and "data.download=false" in msg
    assert str(tmp_path.resolve()) in msg

    import torchvision.datasets.utils as tvu

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network unreachable")

    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match="data.root") as e:
        load_cifar("cifar100", tmp_path, download=True)
    assert "\n" not in str(e.value) and "download failed" in str(e.value) and "RIFT_BN_DATA" in str(e.value)
    with pytest.raises(DataError, match="data"):
        load_cifar("svhn", tmp_path)
    with pytest.raises(DataError, match="cifar10, cifar100"):
        CIFARDataModule("mnist")


# --------------------------------------------------------------------------- (f) TensorLoader


def _loader_ids(loader: TensorLoader) -> list[int]:
    return [int(i) for _, y in loader for i in y]


def test_tensor_loader_order_and_len() -> None:
    x = torch.arange(103, dtype=torch.uint8).view(103, 1, 1, 1).expand(103, 3, 2, 2)
    y = torch.arange(103)
    plain = TensorLoader(x, y, batch_size=10)
    assert len(plain) == 11 and _loader_ids(plain) == list(range(103))
    batches = list(plain)
    assert batches[0][0].dtype == torch.uint8 and batches[-1][0].shape[0] == 3
    assert torch.equal(batches[4][0][:, 0, 0, 0].long(), batches[4][1])
    dropped = TensorLoader(x, y, batch_size=10, drop_last=True)
    assert len(dropped) == 10 and len(list(dropped)) == 10 and _loader_ids(dropped) == list(range(100))
    assert len(TensorLoader(x[:0], y[:0], batch_size=10)) == 0 and list(TensorLoader(x[:0], y[:0], 4)) == []

    sh = TensorLoader(x, y, batch_size=10, shuffle=True, seed=5)
    e0, e1 = _loader_ids(sh), _loader_ids(sh)
    assert sorted(e0) == sorted(e1) == list(range(103)) and e0 != e1 and e0 != list(range(103))
    again = TensorLoader(x, y, batch_size=10, shuffle=True, seed=5)
    assert _loader_ids(again) == e0 and _loader_ids(again) == e1
    again.set_epoch(0)
    assert _loader_ids(again) == e0 and _loader_ids(again) == e0  # pinned until set_epoch again
    again.set_epoch(1)
    assert _loader_ids(again) == e1
    assert _loader_ids(TensorLoader(x, y, batch_size=10, shuffle=True, seed=6)) != e0
    epochs = iter([3, 3])
    follow = TensorLoader(x, y, batch_size=10, shuffle=True, seed=5, epoch_fn=lambda: next(epochs))
    assert _loader_ids(follow) == _loader_ids(follow)


@pytest.mark.parametrize("shuffle", [False, True])
def test_tensor_loader_sharding(shuffle: bool) -> None:
    y = torch.arange(96)
    x = torch.zeros(96, 1, dtype=torch.uint8)
    shards = [_loader_ids(TensorLoader(x, y, 8, shuffle, seed=1, rank=r, world_size=4)) for r in range(4)]
    assert all(len(s) == 24 for s in shards)
    assert sorted(sum(shards, [])) == list(range(96))
    # uneven: padded by wrapping, equal batch counts on every rank, everything covered
    y, x = torch.arange(99), torch.zeros(99, 1, dtype=torch.uint8)
    loaders = [TensorLoader(x, y, 8, shuffle, seed=1, rank=r, world_size=4) for r in range(4)]
    shards = [_loader_ids(ld) for ld in loaders]
    assert {len(ld) for ld in loaders} == {4} and {len(s) for s in shards} == {25}
    flat = sum(shards, [])
    assert set(flat) == set(range(99)) and len(flat) == 100
    with pytest.raises(ValueError):
        TensorLoader(x, y, 8, rank=1)


def test_global_batch_is_split_among_ranks() -> None:
    """DDP keeps the recipe's batch: at every step the W ranks together hold the single-process batch."""
    y, x = torch.arange(96), torch.zeros(96, 1, dtype=torch.uint8)
    single = [sorted(int(i) for i in b) for _, b in TensorLoader(x, y, 16, True, seed=2, global_batch=True)]
    ranks = [
        list(TensorLoader(x, y, 16, True, seed=2, rank=r, world_size=4, global_batch=True)) for r in range(4)
    ]
    assert [len(r) for r in ranks] == [6] * 4 and all(len(b) == 4 for r in ranks for _, b in r)
    steps = [sorted(int(i) for r in ranks for i in r[step][1]) for step in range(6)]
    assert steps == single
    with pytest.raises(DataError, match=r"^batch_size=16: does not split evenly among 3 processes"):
        len(TensorLoader(x, y, 16, rank=0, world_size=3, global_batch=True))


# --------------------------------------------------------------------------- (g) test-split accounting


def test_test_access_counter(tmp_path: Path) -> None:
    dm = CIFARDataModule(root=write_fake_cifar10(tmp_path), val_size=20, download=False, eval_batch_size=16)
    dm.prepare_data()
    dm.setup()
    dm.setup("fit")
    list(dm.train_dataloader())
    list(dm.val_dataloader())
    _ = (dm.train_x, dm.val_x, dm.num_classes)
    assert dm.test_accesses == 0
    assert not hasattr(dm, "test_x") and not hasattr(dm, "test_y")
    loader = dm.test_dataloader()
    assert dm.test_accesses == 1 and len(loader) == 3
    dm.test_tensors()
    assert dm.test_accesses == 2
    fresh = CIFARDataModule(root=tmp_path, download=False)
    with pytest.raises(RuntimeError):
        fresh.test_tensors()


def test_lightning_fit_with_tensor_loader(tmp_path: Path) -> None:
    import lightning

    dm = CIFARDataModule(root=write_fake_cifar10(tmp_path), val_size=20, batch_size=32, download=False)
    seen: list[list[int]] = []

    class Tiny(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3 * 32 * 32, 10)

        def on_after_batch_transfer(self, batch, dataloader_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            return (augment(to_float(x)) if self.training else to_float(x)), y

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            if batch_idx == 0:
                seen.append(y.tolist())
            return F.cross_entropy(self.lin(x.flatten(1)), y)

        def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            self.log("val_loss", F.cross_entropy(self.lin(x.flatten(1)), y))

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = lightning.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(Tiny(), datamodule=dm)
    assert trainer.num_training_batches == 8 and len(seen) == 2 and seen[0] != seen[1]
    for epoch, labels in enumerate(seen):  # the training order follows trainer.current_epoch
        ref = TensorLoader(dm.train_x, dm.train_y, 32, shuffle=True, seed=dm.seed)
        ref.set_epoch(epoch)
        assert next(iter(ref))[1].tolist() == labels
    assert dm.test_accesses == 0


def test_train_loader_follows_trainer_epoch(tmp_path: Path) -> None:
    dm = CIFARDataModule(root=write_fake_cifar10(tmp_path), val_size=20, batch_size=32, download=False)
    dm.setup()
    dm.trainer = SimpleNamespace(current_epoch=5)  # type: ignore[assignment]
    ref = TensorLoader(dm.train_x, dm.train_y, 32, shuffle=True, seed=dm.seed)
    ref.set_epoch(5)
    loader = dm.train_dataloader()
    assert _loader_ids(loader) == _loader_ids(ref) == _loader_ids(loader)  # resumed runs keep the order
