"""End-to-end runs through the real entry point (subprocesses, real CIFAR-10 images)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from rift_bn.interpolate import choose_alpha
from rift_bn.models import build_model
from rift_bn.models.checkpoint import load_into, read_state_dict
from tests.conftest import load_results, moved_tensors, of_selected, reevaluate, results_paths

pytestmark = pytest.mark.slow


def test_adversarial_training_smoke(cli) -> None:
    proc = cli("+experiment=at")
    (path,) = results_paths(proc)
    assert path.parent == cli.tmp / "out1" and path.exists()
    r = json.loads(path.read_text())
    assert (
        r["stage"] == "at" and r["dataset"] == "cifar10" and r["model"] == "resnet18" and r["method"] is None
    )
    assert r["base"] == r["final"] and r["delta"] == {"clean_acc": 0.0, "robust_acc": 0.0}
    assert r["schema_version"] == 2 and (r["experiment"]["name"], r["experiment"]["stage"]) == ("at", "at")
    for key in ("clean_acc", "robust_acc"):
        assert 0.0 <= r["final"][key] <= 100.0
    assert r["test_split_reads_before_report"] == 0
    assert r["config"]["attack"]["steps"] == 10 and r["config"]["model"]["width"] == 8
    assert [h["epoch"] for h in r["base_training"]["history"]] == [1]
    assert "adversarial_training" in r["timings"]
    ckpt = cli.cache / "base" / r["base"]["checkpoint"].rsplit("/", 1)[-1]
    assert ckpt.exists() and ckpt.with_suffix(".json").exists()
    model = build_model("resnet18", 10, 8)
    load_into(model, read_state_dict(ckpt))  # strict: the published key layout
    # The base model is cached: a forced rerun reuses it; with the evaluation cache gone it measures the
    # test numbers again and gets them exactly.
    shutil.rmtree(cli.cache / "eval")
    again = load_results(cli("+experiment=at", "force=true"))[0]
    assert "adversarial_training" not in again["timings"]
    assert list((cli.cache / "eval").glob("*-test-*.json"))  # written anew
    assert again["final"] == r["final"]


def test_topk_multirun(cli) -> None:
    proc = cli("+experiment=topk", "data=cifar10", "k=1,2", multirun=True)
    runs = load_results(proc)
    assert sorted((r["method"], r["k"]) for r in runs) == [
        ("rift", 1),
        ("rift", 2),
        ("rift_bn", 1),
        ("rift_bn", 2),
    ]
    assert len({json.dumps(r["base"]) for r in runs}) == 1  # one base model, evaluated once, shared
    assert {r["experiment"]["name"] for r in runs} == {"topk"}
    assert len({r["experiment"]["group"] for r in runs}) == 1  # one experiment (one table), four rows
    tables = {}
    for r in runs:
        assert r["stage"] == "finetune" and r["dataset"] == "cifar10"
        assert r["test_split_reads_before_report"] == 0
        kinds = {"conv", "linear"} | ({"bn"} if r["method"] == "rift_bn" else set())
        assert {row["type"] for row in r["mrc"]} == kinds
        assert len(r["mrc"]) == (21 if r["method"] == "rift" else 41)
        lowest = sorted(r["mrc"], key=lambda row: row["mrc"])[: r["k"]]
        assert [s["name"] for s in r["selected"]] == [row["name"] for row in lowest]
        assert [p["alpha"] for p in r["interpolation"]] == [0.0, 0.5, 1.0]
        base_val = r["selection_split"]["base"]
        assert r["alpha"] == choose_alpha(r["interpolation"], base_val["robust_acc"], 0.0)["alpha"]
        assert [h["epoch"] for h in r["history"]] == [0, 1]
        final = build_model("resnet18", 10, 8)
        load_into(final, read_state_dict(r["final"]["checkpoint"]))
        assert r["delta"]["clean_acc"] == pytest.approx(r["final"]["clean_acc"] - r["base"]["clean_acc"])
        tables.setdefault(r["method"], []).append(r["mrc_source"])
        tables[r["method"] + "_rows"] = {row["name"]: row["mrc"] for row in r["mrc"]}
        tables[r["method"] + "_exact"] = {
            row["name"] for row in r["mrc"] if row.get("status", "exact") == "exact"
        }
    # MRC computed once per module: the first job of each method computes, the second hits the cache.
    assert sorted(tables["rift"]) == ["cache", "computed"] and sorted(tables["rift_bn"]) == [
        "cache",
        "computed",
    ]
    # a module exact in both tables has one value (topk bounds the rest: mrc.exact_lowest, a later job
    # may extend a bound, never change an exact value)
    shared = [
        (n, v) for n, v in tables["rift_rows"].items() if n in tables["rift_exact"] & tables["rift_bn_exact"]
    ]
    assert shared and all(tables["rift_bn_rows"][name] == value for name, value in shared)
    assert (
        len(list((cli.cache / "mrc").glob("*.json"))) == 1
        and len(list((cli.cache / "base").glob("*.pt"))) == 1
    )

    # mrc.estimator=linear through the entry point: same base, its own MRC table, the k lowest of it
    (lin,) = load_results(cli("method=rift_bn", "k=2", "mrc.estimator=linear"))
    assert [row["name"] for row in lin["mrc"]] == list(tables["rift_bn_rows"])
    assert all(row["estimator"] == "linear" and row["robust_acc_drop"] is None for row in lin["mrc"])
    lowest = sorted(lin["mrc"], key=lambda row: row["mrc"])[:2]
    assert [s["name"] for s in lin["selected"]] == [row["name"] for row in lowest]
    assert lin["mrc_source"] == "computed" and lin["base"] == runs[0]["base"]
    assert sorted(p.name.split("-")[1] for p in (cli.cache / "mrc").glob("*.json")) == ["exact", "linear"]


def test_k_above_candidates_is_a_one_line_error(cli) -> None:
    proc = cli("method=rift", "k=99", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: k=99:") and "21" in lines[-1]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not list(cli.tmp.rglob("results.json")) and not (cli.cache / "base").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_trainer_without_a_gpu_is_a_one_line_error(cli) -> None:
    proc = cli("trainer=gpu", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("error: trainer.accelerator=gpu: no CUDA GPU")
    assert not (cli.cache / "base").exists() and not (cli.cache / "mrc").exists()  # before any work


def test_final_model_matches_its_checkpoint(cli) -> None:
    """bn_only with alpha* forced to 1: only BN tensors move (running statistics included), every other
    tensor is bit-for-bit the base model's, and the reported test numbers are those of final.pt."""
    (r,) = load_results(cli("method=bn_only", "interpolation.alphas=[1.0]"))
    assert r["k"] is None and r["mrc"] == [] and r["mrc_source"] is None and r["alpha"] == 1.0
    assert {s["type"] for s in r["selected"]} == {"bn"} and len(r["selected"]) == 20
    moved = moved_tensors(r)
    assert moved and of_selected(r, moved)
    assert {k.rsplit(".", 1)[1] for k in moved} >= {"weight", "bias", "running_mean", "running_var"}
    assert reevaluate(r) == {k: r["final"][k] for k in ("clean_acc", "robust_acc")}
