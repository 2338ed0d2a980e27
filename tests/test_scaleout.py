"""W&B records, DDP inside a run, parallel sweep jobs, and shared caches under races."""

from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rift_bn import cache
from tests.conftest import load_results, moved_tensors, of_selected

pytestmark = pytest.mark.slow


def _wandb(args: list[str]) -> str:
    return subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", *args], capture_output=True, text=True, check=True
    ).stdout


def wandb_runs(root: Path) -> list[dict]:
    """Every offline W&B run below ``root``: summary view and history records."""
    runs = []
    for f in sorted(root.rglob("offline-run-*/run-*.wandb")):
        info = json.loads(_wandb(["--summary", "--json", str(f)]))
        records = [json.loads(line) for line in _wandb(["--json", str(f)]).splitlines() if line.strip()]
        runs.append({"info": info, "records": records, "text": json.dumps(records)})
    return runs


def test_wandb_offline_run_holds_what_dashboards_need(cli) -> None:
    proc = cli("method=rift_bn", "k=2", "logger=wandb")
    (r,) = load_results(proc)
    runs = wandb_runs(proc.out_dir)
    assert len(runs) == 2  # the base model's adversarial training, then this fine-tuning run
    at = next(run for run in runs if "stage:at" in run["info"]["tags"])
    ft = next(run for run in runs if "stage:finetune" in run["info"]["tags"])
    assert not any(t.startswith("method:") for t in at["info"]["tags"])
    info = json.dumps(ft["info"])
    for tag in ("data:cifar10", "method:rift_bn", "k:2", "seed:0", "stage:finetune"):
        assert tag in info, tag
    assert r["config"]["finetune"]["lr"] == ft["info"]["config"]["finetune"]["lr"]
    summary = ft["info"]["summary"]
    assert summary["test/clean_acc"] == pytest.approx(r["final"]["clean_acc"])
    assert summary["test/robust_acc"] == pytest.approx(r["final"]["robust_acc"])
    assert summary["delta/clean_acc"] == pytest.approx(r["delta"]["clean_acc"])
    assert summary["alpha"] == r["alpha"]
    assert summary["selected"] == [s["name"] for s in r["selected"]]
    assert summary["k"] == r["k"] == 2 and summary["n_selected"] == len(r["selected"])
    assert {"finetune", "interpolation", "test_eval"} <= r["timings"].keys()
    for stage, seconds in r["timings"].items():  # every stage's seconds, as in results.json
        assert summary[f"timings/{stage}"] == pytest.approx(seconds), stage
    for key in ("val/clean_acc", "val/robust_acc", "train/loss", "mrc_table", "interpolation"):
        assert key in ft["text"], key
    # one epoch numbering (1-based, as results.json's history): train and val rows of an epoch agree,
    # and the summary's epoch is the number of epochs run
    epochs = r["config"]["finetune"]["epochs"]
    rows = [rec["history"]["item"] for rec in ft["records"] if rec.get("type") == "history"]
    expected = [float(e) for e in range(1, epochs + 1)]
    assert [float(h["epoch"]) for h in rows if "val/clean_acc" in h] == expected
    assert [float(h["epoch"]) for h in rows if "train/loss" in h] == expected
    assert r["history"][-1]["epoch"] == summary["epoch"] == epochs
    assert ft["info"]["name"] == "finetune-cifar10-rift_bn-k2-s0" and at["info"]["name"] == "at-cifar10-s0"
    for run, job_type in ((at, "at"), (ft, "finetune")):  # typed by stage, grouped by the run/sweep folder
        assert f'"job_type": "{job_type}"' in run["text"]
        assert f'"run_group": "run-{proc.out_dir.parent.name}-{proc.out_dir.name}"' in run["text"]


def _same_choices(runs: list[dict]) -> dict:
    """What a sweep decided and measured, per job (checkpoint paths aside)."""
    return {
        (r["method"], r["k"]): (
            [s["name"] for s in r["selected"]],
            r["mrc"],
            {k: v for k, v in r["base"].items() if k != "checkpoint"},
            {k: v for k, v in r["final"].items() if k != "checkpoint"},
            r["alpha"],
        )
        for r in runs
    }


def test_ddp_two_processes_match_single_process(cli) -> None:
    # alpha* forced to 1, so the final model is the fine-tuned one and its frozen tensors can be checked
    single = load_results(cli("method=rift_bn", "k=1,2", "interpolation.alphas=[1.0]", multirun=True))
    # A base trained under DDP has a cache slot of its own (synchronised BN statistics, another float
    # order: tests/test_config.py); the single-process base is handed over to compare the fine-tuning.
    ddp = cli(
        "method=rift_bn",
        "k=1,2",
        "interpolation.alphas=[1.0]",
        f"base.checkpoint={single[0]['base']['checkpoint']}",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "force=true",
        multirun=True,
    )
    runs = load_results(ddp)
    assert len(runs) == 2 and len(list(ddp.out_dir.rglob("results.json"))) == 2
    assert all(r["config"]["trainer"]["strategy"] == "ddp" for r in runs)
    one = {r["k"]: [s["name"] for s in r["selected"]] for r in single}
    assert {r["k"]: [s["name"] for s in r["selected"]] for r in runs} == one
    assert all(r["mrc_source"] == "cache" for r in runs)  # computed once, by the single-process sweep
    assert all(r["history"][-1]["epoch"] == 1 for r in runs)
    for r in runs:  # both ranks fine-tuned the selected modules only: the rest is bit-for-bit the base
        moved = moved_tensors(r)
        assert r["alpha"] == 1.0 and moved and of_selected(r, moved)
        assert {k.rsplit(".", 1)[0] for k in moved} >= {s["name"] for s in r["selected"]}


def test_parallel_launcher_matches_serial_sweep(tmp_path, cifar_root) -> None:
    from tests.conftest import CLI

    (tmp_path / "serial").mkdir()
    (tmp_path / "parallel").mkdir()
    sweep = ("+experiment=topk", "data=cifar10", "k=1,2")
    # joblib's workers run one thread each; so does the serial sweep, for bit-identical float sums
    one = CLI(tmp_path / "serial", cifar_root)
    one.env["OMP_NUM_THREADS"] = "1"
    serial = load_results(one(*sweep, multirun=True))
    par = CLI(tmp_path / "parallel", cifar_root)
    runs = load_results(par(*sweep, "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", multirun=True))
    assert len(runs) == 4
    # two jobs started together on a cold cache: one trained the base model, the other waited for it
    assert sum("adversarial_training" in r["timings"] for r in runs) == 1
    assert len(list((par.cache / "base").glob("*.pt"))) == 1
    assert _same_choices(runs) == _same_choices(serial)


def _compute_once(path: str, log: str, start: Any) -> None:
    start.wait(60)  # all three reach the cache together: the lock, not the timing, must serialise them

    def compute() -> dict:
        with open(log, "a") as f:
            f.write("computed\n")
        import time

        time.sleep(1.0)
        return {"value": 42}

    value, _ = cache.cached(path, compute, cache.write_json, cache.read_json)
    assert value == {"value": 42}


def test_cache_computes_once_under_a_race(tmp_path) -> None:
    path, log = str(tmp_path / "entry.json"), str(tmp_path / "log")
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(3)
    procs = [ctx.Process(target=_compute_once, args=(path, log, start)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert Path(log).read_text() == "computed\n"
    assert json.loads(Path(path).read_text()) == {"value": 42}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # nothing torn or left behind


def test_cache_files_follow_the_umask(tmp_path) -> None:
    """A shared cache: entries are as readable as any file the user writes (mkstemp alone makes 0600)."""
    import os
    import stat

    path = tmp_path / "entry.json"
    cache.write_json(path, {"value": 1})
    cache.save_tensors(tmp_path / "t.pt", {"x": 1})
    for written in (path, tmp_path / "t.pt"):  # 0644 under the usual umask 022
        assert stat.S_IMODE(os.stat(written).st_mode) == 0o666 & ~cache._UMASK
