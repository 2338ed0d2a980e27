"""The benchmark runs at tiny size and its equality checks hold; the GPU-path settings run on CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import bench
from rift_bn.attacks import PGD
from rift_bn.data import TensorLoader
from rift_bn.models import build_model
from rift_bn.modules import AdversarialTraining, quiet_trainer

RATIOS = ("pgd_vs_torchattacks", "pgd_vs_floor", "mrc_vs_reference", "at_step_vs_plain")


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    return bench.main(["--quick", "--json", str(path)]), path


def test_quick_bench_reports_every_ratio(quick: tuple[dict, Path]) -> None:
    out, path = quick
    for key in RATIOS:
        assert math.isfinite(out[key]) and out[key] > 0, key
        assert key in out["met"]
    assert json.loads(path.read_text())["pgd_vs_torchattacks"] == out["pgd_vs_torchattacks"]
    m = out["machine"]
    assert m["device"] == "cpu" and m["threads"] == 1 and m["torch"] == torch.__version__
    assert {"model", "width", "batch"} <= set(out["config"])
    assert "pgd_vs_torchattacks" in bench.table(out)


def test_quick_bench_values_agree(quick: tuple[dict, Path]) -> None:
    out, _ = quick
    assert out["pgd"]["identical"] and out["pgd"]["in_ball"]  # torch.equal with torchattacks' images
    r = out["mrc"]
    assert r["candidates"] == 41  # ResNet-18, rift_bn: 20 conv + 20 bn + 1 linear
    assert r["mrc_range"][0] > 1e-2  # values well above float noise, so the comparison means something
    assert out["mrc_max_rel_diff"] <= 1e-4
    assert out["mrc_same_ranking"] and r["same_drop"]


def test_groups_cover_every_candidate_once() -> None:
    names = [
        "conv1",
        "bn1",
        "layer1.0.conv1",
        "layer1.0.bn1",
        "layer2.0.conv1",
        "layer2.0.bn1",
        "layer2.1.conv1",
        "linear",
    ]
    groups = bench._groups(names)
    assert [n for g in groups for n in g] == names
    assert all(len(g) >= 3 for g in groups)


@pytest.mark.parametrize(
    "precision, channels_last, compiled",
    [
        ("bf16-mixed", False, False),
        ("32-true", True, False),
        ("bf16-mixed", True, True),
    ],
)
def test_gpu_settings_run_on_cpu(tmp_path: Path, precision: str, channels_last: bool, compiled: bool) -> None:
    """trainer.precision=bf16-mixed, model.channels_last=true, model.compile=true: an AT step + validation."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module = AdversarialTraining(
            build_model("resnet18", 10, 4), PGD(steps=2), PGD(steps=2), 10, channels_last=channels_last
        )
        if compiled:  # as the pipeline does (model.net.compile()); aot_eager skips the slow C++ codegen
            module.model.net.compile(backend="aot_eager")
        x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
        y = torch.randint(0, 10, (16,))
        before = {k: v.clone() for k, v in module.model.state_dict().items()}
        trainer = quiet_trainer(devices=1, precision=precision, max_epochs=1, default_root_dir=str(tmp_path))
        trainer.fit(module, train_dataloaders=TensorLoader(x, y, 8), val_dataloaders=TensorLoader(x, y, 8))
        after = module.model.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before)
        assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
        assert module.history and 0 <= module.history[-1]["robust_acc"] <= 100
        if channels_last:
            assert module.model.net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    finally:
        torch.set_num_threads(old)
        torch._dynamo.reset()
