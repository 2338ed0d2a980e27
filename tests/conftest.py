"""Shared fixtures and helpers of the test modules (which never import one another): small real CIFAR-10
layouts, a runner for the real entry point, configs composed in process, small models, and writers of
the official data layouts at toy size."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch import nn

import rift_bn.schema  # noqa: F401  registers the config schema, as rift_bn.run does

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
JPEG = Path(os.environ.get("RIFT_BN_CIFAR10_JPEG", REPO.parent / "shared" / "data" / "cifar10-jpeg"))

# A run small enough for tests: real images, narrow network, one short epoch per stage, PGD-10 evaluation.
TINY = [
    "scale=smoke",
    "model.width=8",
    "data.train_subset=600",
    "data.val_size=100",
    "data.test_subset=100",
    "at.epochs=1",
    "at.milestones=[1]",
    "finetune.epochs=1",
    "finetune.milestones=[1]",
    "mrc.epochs=2",
    "mrc.batch_size=50",
    "eval.batch_size=100",
    "logger=csv",
]


def cifar_layout(factory: pytest.TempPathFactory, train: int, test: int) -> Path:
    """A CIFAR-10 python layout of ``train`` / ``test`` real images written from the workspace JPEG copy."""
    if not (JPEG / "to_cifar_layout.py").is_file():
        pytest.skip(f"real CIFAR-10 copy not found at {JPEG} (set RIFT_BN_CIFAR10_JPEG)")
    root = factory.mktemp("cifar")
    subprocess.run(
        [
            sys.executable,
            str(JPEG / "to_cifar_layout.py"),
            str(root),
            "--train",
            str(train),
            "--test",
            str(test),
        ],
        check=True,
        capture_output=True,
    )
    return root


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2,000 train / 300 test real CIFAR-10 images (the end-to-end runs)."""
    return cifar_layout(tmp_path_factory, 2000, 300)


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 train / 50 test real CIFAR-10 images (the report's Figure 3)."""
    return cifar_layout(tmp_path_factory, 300, 50)


class CLI:
    """Runs ``python -m rift_bn.run`` in a subprocess with its own cache and output folders."""

    def __init__(self, tmp: Path, data_root: Path | None) -> None:
        self.tmp, self.cache = tmp, tmp / "cache"
        self.env = {
            **os.environ,
            "RIFT_BN_CACHE": str(self.cache),
            "WANDB_MODE": "offline",
            "WANDB_SILENT": "true",
            "PYTHONUNBUFFERED": "1",
            "HYDRA_FULL_ERROR": "0",
        }
        if data_root is not None:
            self.env["RIFT_BN_DATA"] = str(data_root)
        self.count = 0

    def __call__(
        self,
        *overrides: str,
        multirun: bool = False,
        check: bool = True,
        tiny: bool = True,
        timeout: float = 600,
    ) -> subprocess.CompletedProcess:
        self.count += 1
        out = self.tmp / f"out{self.count}"
        args = [*(TINY if tiny else []), *overrides, f"hydra.run.dir={out}", f"hydra.sweep.dir={out}"]
        cmd = [sys.executable, "-m", "rift_bn.run", *args, *(["-m"] if multirun else [])]
        proc = subprocess.run(
            cmd, cwd=self.tmp, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        proc.out_dir = out
        if check and proc.returncode != 0:
            raise AssertionError(
                f"exit {proc.returncode}\nSTDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-5000:]}"
            )
        return proc


@pytest.fixture()
def cli(tmp_path: Path, cifar_root: Path) -> CLI:
    return CLI(tmp_path, cifar_root)


@pytest.fixture()
def offline_download(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], list[str]]:
    """torchvision's download path with the network replaced: ``serve(archive)`` makes every download
    fetch a copy of ``archive`` and returns the list of URLs fetched (filled as downloads happen)."""
    import shutil

    import torchvision.datasets.utils as tvu

    def serve(archive: Path) -> list[str]:
        fetched: list[str] = []

        def fetch(url: str, filename: str, chunk_size: int = 0) -> None:
            fetched.append(url)
            shutil.copy(archive, filename)

        monkeypatch.setattr(tvu, "_get_redirect_url", lambda url, max_hops=3: url)
        monkeypatch.setattr(tvu, "_urlretrieve", fetch)
        return fetched

    return serve


# --------------------------------------------------------------------------- configs, in process


def composed(*overrides: str) -> DictConfig:
    """The config ``python -m rift_bn.run <overrides>`` composes (unresolved, without Hydra's job context)."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture()
def hydra_job(tmp_path: Path) -> Iterator[Callable[..., DictConfig]]:
    """Composes a job config with Hydra's job context set (output folder ``tmp_path / "out"``), as
    ``python -m rift_bn.run`` has it, for :func:`rift_bn.pipeline.run_job` in process."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    def make(*overrides: str) -> DictConfig:
        with initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
        with read_write(cfg.hydra), open_dict(cfg.hydra):
            cfg.hydra.runtime.output_dir = str(tmp_path / "out")
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg

    yield make
    HydraConfig.instance().cfg = None  # type: ignore[assignment]


def refused(*argv: str) -> str:
    """precheck's reason for the command line ``argv`` (what ``python -m rift_bn.run`` prints after
    ``error: `` before exiting with 2), asserted to be a single line."""
    from rift_bn.precheck import precheck

    msg = precheck(list(argv))
    assert isinstance(msg, str) and msg, f"accepted: {argv}"
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def results_paths(proc: subprocess.CompletedProcess) -> list[Path]:
    """The paths announced by the run's ``results: <path>`` lines."""
    return [
        Path(line.split("results: ", 1)[1].strip())
        for line in proc.stdout.splitlines()
        if line.startswith("results: ")
    ]


def load_results(proc: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(p.read_text()) for p in results_paths(proc)]


def moved_tensors(r: dict) -> set[str]:
    """Checkpoint keys whose tensors differ (not bit-identical) between a run's base and final models."""
    base = torch.load(r["base"]["checkpoint"], weights_only=True)
    final = torch.load(r["final"]["checkpoint"], weights_only=True)
    assert final.keys() == base.keys()
    return {k for k in base if not torch.equal(base[k], final[k])}


def of_selected(r: dict, keys: set[str]) -> bool:
    """Whether every key belongs to one of the run's selected modules."""
    prefixes = tuple(s["name"] + "." for s in r["selected"])
    return all(k.startswith(prefixes) for k in keys)


def reevaluate(r: dict, which: str = "final") -> dict[str, float]:
    """A run's ``which`` checkpoint evaluated again in float32 on its test split, with the run's random
    starts (seed + 4), as the run does."""
    from omegaconf import OmegaConf

    from rift_bn.attacks import PGD
    from rift_bn.data import CIFARDataModule
    from rift_bn.evaluate import evaluate
    from rift_bn.models import build_model
    from rift_bn.models.checkpoint import load_into, read_state_dict
    from rift_bn.seeds import SeedStream, seeded

    cfg = OmegaConf.create(r["config"])
    d = cfg.data
    dm = CIFARDataModule(
        d.name, d.root, d.val_size, d.train_subset, d.test_subset, seed=cfg.seed, download=False,
        selection_source=d.selection_source,
    )  # fmt: skip
    dm.setup()
    model = build_model(cfg.model.name, dm.num_classes, cfg.model.width)
    load_into(model, read_state_dict(r[which]["checkpoint"]))
    with seeded(cfg.seed, SeedStream.TEST_EVAL):
        return evaluate(
            model, *dm.test_tensors(), PGD.from_config(cfg.attack), dm.num_classes, cfg.eval.batch_size
        )


@pytest.fixture(scope="module")
def critical() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """bench --quick's MRC setting: a random ResNet-18 (width 4) with calibrated BN statistics, random BN
    affines and a scaled classifier, on 32 random images (substantial MRC values and robust-accuracy
    drops, so a wrong protocol cannot hide in float noise)."""
    from benchmarks.bench import mrc_model

    torch.manual_seed(0)
    model = mrc_model("resnet18", 4, 0)
    x, y = torch.rand(32, 3, 32, 32), torch.randint(0, 10, (32,))
    return model, x, y


class TinyConvBN(nn.Module):
    """conv-bn-relu-linear on 3x4x4 images, without ``stages()`` (the linear MRC estimator then treats the
    model as one stage)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


class StagedConvBN(TinyConvBN):
    """TinyConvBN with ``stages()`` (exact MRC needs them)."""

    def stages(self) -> list[nn.Module]:
        return [nn.Sequential(self.conv, self.bn, nn.ReLU(), nn.Flatten()), self.fc]


# --------------------------------------------------------------------------- official layouts, written small


def dump_pickle(path: Path, d: dict) -> None:
    """``d`` pickled to ``path`` as the official CIFAR batches are (bytes keys, any protocol loads)."""
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=4)


def signature_ids(x: torch.Tensor) -> set[int]:
    """The ids :func:`write_fake_cifar10` wrote into images ``x`` (N, 3, 32, 32)."""
    return set((x[:, 0, 0, 0].long() + 256 * x[:, 0, 0, 1].long()).tolist())


def _signature_images(ids: np.ndarray, marker: int) -> np.ndarray:
    """N x 3072 uint8 (R plane, G plane, B plane): random, each id in the first two R bytes, ``marker`` in
    the first G byte."""
    rng = np.random.default_rng(int(ids[0]) if len(ids) else 0)
    data = rng.integers(0, 256, (len(ids), 3072), dtype=np.uint8)
    data[:, 0] = ids % 256
    data[:, 1] = ids // 256
    data[:, 1024] = marker  # first pixel of the G plane
    return data


def write_fake_cifar10(root: Path, n_train: int = 250, n_test: int = 40) -> Path:
    """``root/cifar-10-batches-py`` in the official pickle format with random images: image ``i`` of a
    split carries ``i`` in its first two R bytes (``i % 256``, ``i // 256``; read back by
    :func:`signature_ids`) and its split in the first G byte (0 train, 1 test); labels are ``i % 10``;
    the training images in five batches. Returns ``root``."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    ids = np.arange(n_train)
    x, y = _signature_images(ids, marker=0), ids % 10
    for b, part in enumerate(np.array_split(ids, 5), start=1):
        dump_pickle(folder / f"data_batch_{b}", {b"data": x[part], b"labels": y[part].tolist()})
    tid = np.arange(n_test)
    test = {b"data": _signature_images(tid, marker=1), b"labels": (tid % 10).tolist()}
    dump_pickle(folder / "test_batch", test)
    return root


CIFAR100_META = REPO.parent / "shared" / "data" / "cifar100-meta" / "meta"


def write_fake_cifar100(root: Path, n_train: int, n_test: int, seed: int) -> Path:
    """``root/cifar-100-python/{train,test,meta}`` in the official pickle format (bytes keys ``data``,
    ``fine_labels``, ``coarse_labels``, ``filenames``, ``batch_label``) with random images; ``meta`` is the
    official file (real label names). Image ``i`` of a split carries ``i`` in its first two R bytes
    (``i % 256``, ``i // 256``); fine labels cycle through all 100 classes in a seeded order; coarse labels
    are ``fine // 5`` (not the official grouping: the loader reads only the fine ones). Returns ``root``."""
    import pickle
    import shutil

    import numpy as np

    if not CIFAR100_META.is_file():
        pytest.skip(f"the official CIFAR-100 meta file is not at {CIFAR100_META}")
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        ids = np.arange(n)
        data[:, 0], data[:, 1] = ids % 256, ids // 256
        fine = rng.permutation(ids % 100)
        d = {
            b"batch_label": f"{split} batch".encode(),
            b"filenames": [f"{split}_{i}.png".encode() for i in ids],
            b"fine_labels": fine.tolist(),
            b"coarse_labels": (fine // 5).tolist(),
            b"data": data,
        }
        with open(folder / split, "wb") as f:
            pickle.dump(d, f, protocol=2)
    shutil.copy(CIFAR100_META, folder / "meta")
    return root


def write_fake_cifar10_c(root: Path, corruptions: tuple[str, ...], n: int, seed: int) -> Path:
    """``root/CIFAR-10-C/<corruption>.npy`` (uint8 ``(5n, 32, 32, 3)``, severity-major) for each of
    ``corruptions`` and ``labels.npy`` (uint8, the same n labels once per severity), as the official files
    with n test images per severity (10,000 there). Row ``(s - 1) n + i`` is image ``i`` at severity ``s``:
    its pixel (0, 0) holds ``(s, i % 256, index of the corruption)``, the rest is random. Returns the
    folder."""
    import numpy as np

    folder = root / "CIFAR-10-C"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    for c, name in enumerate(corruptions):
        x = rng.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8)
        x[:, 0, 0, 0] = np.repeat(np.arange(1, 6), n)
        x[:, 0, 0, 1] = np.tile(np.arange(n) % 256, 5)
        x[:, 0, 0, 2] = c
        np.save(folder / f"{name}.npy", x)
    np.save(folder / "labels.npy", np.tile(labels, 5))
    return folder


def tiny_imagenet_colour(label: int) -> tuple[int, int, int]:
    """The flat colour :func:`write_fake_tiny_imagenet` paints the images of the ``label``-th wnid of its
    ``wnids.txt``."""
    return (20 + 20 * label, 230 - 20 * label, 128)


def write_fake_tiny_imagenet(root: Path, n_classes: int, per_class_train: int, n_val: int, seed: int) -> Path:
    """``root/tiny-imagenet-200/`` in the official layout with real 64x64 JPEGs: ``wnids.txt`` (unsorted),
    ``train/<wnid>/images/<wnid>_<i>.JPEG`` and ``<wnid>_boxes.txt``, ``val/images/val_<i>.JPEG`` and
    ``val/val_annotations.txt`` (tab-separated, classes in seeded random order, not grouped). Every image of
    the ``k``-th wnid of ``wnids.txt`` is the flat :func:`tiny_imagenet_colour` ``(k)``; each class's first
    training image is greyscale (its R value), as some official ones are. At most 10 classes. Returns the
    folder; its wnids (in ``wnids.txt`` order) are in ``wnids.txt``."""
    import numpy as np
    from PIL import Image

    assert 1 <= n_classes <= 10
    rng = np.random.default_rng(seed)
    wnids = [f"n{w:08d}" for w in rng.choice(10**8, n_classes, replace=False)]
    if n_classes > 1 and wnids == sorted(wnids):
        wnids.reverse()  # so that class index (sorted order) and wnids.txt order differ
    folder = root / "tiny-imagenet-200"
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))

    def jpeg(path: Path, k: int, grey: bool = False) -> None:
        colour = tiny_imagenet_colour(k)
        im = Image.new("L", (64, 64), colour[0]) if grey else Image.new("RGB", (64, 64), colour)
        im.save(path, "JPEG", quality=95)

    for k, wnid in enumerate(wnids):
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(per_class_train):
            jpeg(images / f"{wnid}_{i}.JPEG", k, grey=i == 0)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text(
            "".join(f"{wnid}_{i}.JPEG\t0\t0\t63\t63\n" for i in range(per_class_train))
        )
    val_classes = rng.integers(0, n_classes, n_val)
    lines = []
    for i, k in enumerate(val_classes):
        jpeg(folder / "val" / "images" / f"val_{i}.JPEG", int(k))
        lines.append(f"val_{i}.JPEG\t{wnids[k]}\t0\t0\t63\t63\n")
    (folder / "val" / "val_annotations.txt").write_text("".join(lines))
    return folder
