"""What the CSV / TensorBoard / W&B loggers receive: one epoch numbering, the scalar summary, run names."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from rift_bn.attacks import PGD
from rift_bn.loggers import (
    SummaryCSVLogger,
    SummaryTensorBoardLogger,
    log_summary,
    run_name,
    run_tags,
    summary_scalars,
)
from rift_bn.modules import RobustClassifier, quiet_trainer
from rift_bn.results import Results
from tests.conftest import composed

EPOCHS = 3


class _CleanTraining(RobustClassifier):
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return self.cross_entropy_step(x, y, batch_idx, "test", "lr")


def _loader(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (n,), generator=g)), batch_size=8)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _fit(logger: Any) -> RobustClassifier:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    module = _CleanTraining(nn.Sequential(net, nn.Linear(4, 3)), PGD(steps=1), 3, lr=0.01)
    trainer = quiet_trainer(max_epochs=EPOCHS, logger=logger, log_every_n_steps=1)
    trainer.fit(module, _loader(16, 0), _loader(8, 1))
    return module


RECORD: dict[str, Any] = {  # a version-1 results.json, as far as the loggers read it
    "stage": "finetune",
    "dataset": "cifar10",
    "model": "resnet18",
    "seed": 0,
    "method": "rift_bn",
    "k": 2,
    "alpha": 0.7,
    "selected": [{"name": "bn1", "type": "bn", "mrc": 0.1}, {"name": "conv1", "type": "conv", "mrc": 0.2}],
    "mrc_source": "computed",
    "base": {"clean_acc": 80.0, "robust_acc": 40.0, "checkpoint": "/x/base.pt"},
    "final": {"clean_acc": 82.5, "robust_acc": 40.5, "checkpoint": "/x/final.pt"},
    "delta": {"clean_acc": 2.5, "robust_acc": 0.5},
    "timings": {"mrc": 12.0, "finetune": 30.25, "test_eval": 4.5},
}
RESULTS = Results.from_dict(RECORD)


def test_train_and_val_rows_of_an_epoch_carry_the_same_1_based_epoch(tmp_path: Path) -> None:
    logger = SummaryCSVLogger(save_dir=str(tmp_path), name="csv")
    module = _fit(logger)
    logger.finalize("success")
    rows = _rows(Path(logger.log_dir) / "metrics.csv")
    train = [r for r in rows if r["train/loss"]]
    val = [r for r in rows if r["val/clean_acc"]]
    assert len(train) == len(val) == EPOCHS
    assert all(r["epoch"] for r in rows)  # no row without an epoch
    # one numbering, counted from 1 as on the console and in results.json's history
    expected = [float(e) for e in range(1, EPOCHS + 1)]
    assert [float(r["epoch"]) for r in train] == expected
    assert [float(r["epoch"]) for r in val] == expected
    assert [float(h["epoch"]) for h in module.history] == expected
    # the train and val rows of one epoch: same step, same epoch
    assert [(r["step"], r["epoch"]) for r in train] == [(r["step"], r["epoch"]) for r in val]
    assert float(rows[-1]["epoch"]) == EPOCHS  # last value (W&B's summary): the number of epochs run


def test_summary_scalars_hold_the_report_numbers() -> None:
    s = summary_scalars(RESULTS)
    assert s["test/clean_acc"] == 82.5 and s["test/robust_acc"] == 40.5
    assert s["base/clean_acc"] == 80.0 and s["delta/robust_acc"] == 0.5
    assert s["alpha"] == 0.7 and s["k"] == 2 and s["n_selected"] == 2
    assert {k: v for k, v in s.items() if k.startswith("timings/")} == {
        "timings/mrc": 12.0,
        "timings/finetune": 30.25,
        "timings/test_eval": 4.5,
    }
    assert not any("checkpoint" in k for k in s)


def test_csv_summary_row_after_training(tmp_path: Path) -> None:
    logger = SummaryCSVLogger(save_dir=str(tmp_path), name="csv")
    _fit(logger)
    log_summary(logger, RESULTS)
    logger.finalize("success")
    rows = _rows(Path(logger.log_dir) / "metrics.csv")
    last = rows[-1]
    for key, value in summary_scalars(RESULTS).items():
        assert float(last[key]) == pytest.approx(value), key
    assert float(last["timings/finetune"]) == 30.25
    assert int(last["step"]) == max(int(r["step"]) for r in rows[:-1])  # at the end of the curves
    assert not any(r["test/clean_acc"] for r in rows[:-1])


def test_csv_summary_without_training_leaves_unused_values_out(tmp_path: Path) -> None:
    """Stage ``at`` with a cached base model: a fresh logger; alpha and k are None there."""
    at = RECORD | {"stage": "at", "method": None, "k": None, "alpha": None, "selected": [], "delta": {}}
    logger = SummaryCSVLogger(save_dir=str(tmp_path), name="csv-at")
    log_summary(logger, Results.from_dict(at))
    logger.finalize("success")
    (row,) = _rows(Path(logger.log_dir) / "metrics.csv")
    assert float(row["test/robust_acc"]) == 40.5 and float(row["base/clean_acc"]) == 80.0
    assert float(row["timings/mrc"]) == 12.0 and int(row["n_selected"]) == 0 and row["step"] == "0"
    assert "alpha" not in row and "k" not in row


def test_tensorboard_summary_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = SummaryTensorBoardLogger(save_dir=str(tmp_path), name="tb")
    _fit(logger)
    log_summary(logger, RESULTS)
    logger.finalize("success")
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"test/clean_acc", "delta/clean_acc", "alpha", "k", "n_selected", "timings/finetune"} <= tags
    (point,) = events.Scalars("timings/finetune")
    assert point.value == pytest.approx(30.25)
    assert point.step == max(p.step for p in events.Scalars("train/loss"))
    assert [p.value for p in events.Scalars("epoch")][-1] == EPOCHS


@pytest.mark.parametrize(
    ("method", "k", "name", "k_tag"),
    [
        ("rift_bn", 2, "finetune-cifar10-rift_bn-k2-s0", "k:2"),
        ("rift", 5, "finetune-cifar10-rift-k5-s0", "k:5"),
        ("full", 1, "finetune-cifar10-full-all-s0", "k:all"),
        ("bn_only", 3, "finetune-cifar10-bn_only-all-s0", "k:all"),
        ("conv_linear_only", 1, "finetune-cifar10-conv_linear_only-all-s0", "k:all"),
    ],
)
def test_run_name_matches_the_k_tag(method: str, k: int, name: str, k_tag: str) -> None:
    cfg = composed(f"method={method}", f"k={k}", "stage=finetune")
    assert run_name(cfg, "finetune") == name
    assert k_tag in run_tags(cfg, "finetune")
    assert run_name(cfg, "at") == "at-cifar10-s0"  # the base model's training: no method, no k
