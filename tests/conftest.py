"""Shared fixtures: a small real CIFAR-10 layout and a runner for the real entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
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


def _cifar_layout(factory: pytest.TempPathFactory, train: int, test: int) -> Path:
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
    return _cifar_layout(tmp_path_factory, 2000, 300)


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 train / 50 test real CIFAR-10 images (the report's Figure 3)."""
    return _cifar_layout(tmp_path_factory, 300, 50)


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

    from rift_bn.data import CIFARDataModule
    from rift_bn.evaluate import evaluate
    from rift_bn.models import build_model
    from rift_bn.models.checkpoint import load_into, read_state_dict
    from rift_bn.pipeline import make_attack, seeded

    cfg = OmegaConf.create(r["config"])
    d = cfg.data
    dm = CIFARDataModule(
        d.name, d.root, d.val_size, d.train_subset, d.test_subset, seed=cfg.seed, download=False,
        selection_source=d.selection_source,
    )  # fmt: skip
    dm.setup()
    model = build_model(cfg.model.name, dm.num_classes, cfg.model.width)
    load_into(model, read_state_dict(r[which]["checkpoint"]))
    with seeded(cfg.seed + 4):
        return evaluate(
            model, *dm.test_tensors(), make_attack(cfg.attack), dm.num_classes, cfg.eval.batch_size
        )


@pytest.fixture(scope="module")
def critical() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """bench --quick's MRC setting: a random ResNet-18 (width 4) with calibrated BN statistics, random BN
    affines and a scaled classifier, on 32 random images (substantial MRC values and robust-accuracy
    drops, so a wrong protocol cannot hide in float noise)."""
    from rift_bn.bench import mrc_model

    torch.manual_seed(0)
    model = mrc_model("resnet18", 4, 0)
    x, y = torch.rand(32, 3, 32, 32), torch.randint(0, 10, (32,))
    return model, x, y
