"""rift_bn.report: Table 1 numbers (mean, sample std, n, deltas, pooled paired statistics, alpha*, test
images), the paired RiFT-with-BN-vs-RiFT table, figures (Figure 3 from the runs' saved BN outputs, never an
attack), CLI, W&B upload, notebook; experiments kept apart, duplicate jobs counted once, failed jobs listed,
old results.json files loaded (or refused in one line)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from matplotlib.container import BarContainer

from rift_bn.models import build_model, candidate_modules
from rift_bn.report.bn_outputs import (
    BN_OUTPUTS,
    MODELS,
    VALUES,
    BNOutputs,
    layer_values,
    save_bn_outputs,
)
from rift_bn.report.build import figure_mrc, make_report, report_figures
from rift_bn.report.collect import (
    MISSING_REASON,
    Run,
    experiments,
    load,
    load_runs,
    wandb_target,
)
from rift_bn.report.figures import plot_interpolation, plot_layer_types, plot_mrc
from rift_bn.report.table import final_model_text, fmt, layer_types_table, table1, to_markdown
from rift_bn.results import (
    OUTCOMES,
    Experiment,
    Results,
    experiment_key,
    outcome_stats,
    read_outcomes,
    write_outcomes,
)
from rift_bn.stats import TESTS_NOTE, paired_ci, percent

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Known numbers. Base per seed; fine-tuned = base + delta.
BASE = {0: (80.0, 50.0), 1: (81.0, 51.0), 2: (79.0, 49.0)}
DELTAS = {  # (method, k): {seed: (delta clean, delta robust)}
    ("rift", 1): {0: (1.0, 0.5), 1: (2.0, -0.5), 2: (6.0, 0.0)},
    ("rift_bn", 1): {0: (2.0, 1.0), 1: (2.0, 1.0), 2: (2.0, 1.0)},
    ("rift", 2): {0: (0.5, -0.25)},
    ("rift_bn", 2): {0: (1.5, 0.75)},
    ("bn_only", None): {0: (1.0, 0.2)},
    ("conv_linear_only", None): {0: (2.0, -1.0)},
    ("full", None): {0: (4.0, -6.0)},
}
CONV = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "linear"]
BN = ["bn1", "layer1.0.bn1", "layer1.0.bn2"]
MRC = {
    "conv1": 0.3,
    "layer1.0.conv1": 0.05,
    "layer1.0.conv2": 0.2,
    "linear": 0.4,
    "bn1": 0.01,
    "layer1.0.bn1": 0.02,
    "layer1.0.bn2": 0.5,
}


def _mrc_rows(method: str) -> list[dict]:
    names = ["conv1", "bn1", "layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2", "layer1.0.bn2", "linear"]
    if method == "rift":
        names = [n for n in names if n in CONV]
    kind = lambda n: "linear" if n == "linear" else ("bn" if n in BN else "conv")
    return [
        {"name": n, "type": kind(n), "mrc": MRC[n], "robust_acc_drop": 10 * MRC[n], "epoch": 1} for n in names
    ]


def make_result(
    method: str | None,
    k: int | None,
    seed: int,
    ckpt_dir: Path,
    data_root: Path | None = None,
    logger: str = "csv",
    run_dir: Path | None = None,
) -> dict:
    """A results.json as version 1 wrote it (no ``schema_version``, no ``experiment``: the report computes
    the experiment when it loads), with the documented keys and the known numbers above."""
    b_clean, b_rob = BASE[seed]
    d_clean, d_rob = DELTAS[(method, k)][seed] if method else (0.0, 0.0)
    rows = _mrc_rows(method) if method in ("rift", "rift_bn") else []
    selected = [
        {"name": r["name"], "type": r["type"], "mrc": r["mrc"]}
        for r in sorted(rows, key=lambda r: r["mrc"])[: k or 0]
    ]
    alpha = {"rift": 0.5, "rift_bn": 1.0}.get(method or "", 0.8)
    history = [
        {"epoch": e, "clean_acc": 60 + e * (d_clean + 1), "robust_acc": 40 + e * d_rob} for e in range(4)
    ]
    curve = [
        {"alpha": a, "clean_acc": 60 + 10 * a * (k or 1), "robust_acc": 40 - a * (k or 1)}
        for a in (0.0, 0.5, 1.0)
    ]
    final_ckpt = (run_dir or ckpt_dir) / "final.pt" if method else ckpt_dir / f"base-{seed}.pt"
    return {
        "stage": "finetune" if method else "at",
        "dataset": "cifar10",
        "model": "resnet18",
        "width": 8,
        "method": method,
        "k": k,
        "seed": seed,
        "base": {"clean_acc": b_clean, "robust_acc": b_rob, "checkpoint": str(ckpt_dir / f"base-{seed}.pt")},
        "final": {"clean_acc": b_clean + d_clean, "robust_acc": b_rob + d_rob, "checkpoint": str(final_ckpt)},
        "delta": {"clean_acc": d_clean, "robust_acc": d_rob},
        "selected": selected,
        "mrc": rows,
        "mrc_source": "computed" if rows else None,
        "alpha": alpha if method else None,
        "interpolation": curve if method else [],
        "history": history if method else [],
        "timings": {"mrc": 1.0},
        "test_size": 100,
        "config": {
            "data": {
                "name": "cifar10",
                "num_classes": 10,
                "root": str(data_root or "missing-data"),
                "val_size": 50,
                "train_subset": None,
                "test_subset": None,
            },
            "model": {"name": "resnet18", "width": 8},
            "mrc": {"estimator": "exact"},
            "attack": {"eps": "8/255", "alpha": "2/255", "steps": 10},
            "logger": {"name": logger, "project": "rift_bn_test", "group": None},
        },
    }


def build_sweep(root: Path, data_root: Path | None = None, logger: str = "csv") -> Path:
    """A Hydra-like sweep folder ``root/<i>/results.json`` (+ multirun.yaml) with every setting above."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    ckpts = root.parent / "ckpt"
    ckpts.mkdir(exist_ok=True)
    i = 0
    for (method, k), seeds in DELTAS.items():
        for seed in seeds:
            run_dir = root / str(i)
            run_dir.mkdir()
            (run_dir / "results.json").write_text(
                json.dumps(make_result(method, k, seed, ckpts, data_root, logger, run_dir))
            )
            i += 1
    at = root / str(i)  # a base-model-only run: its base must not count twice
    at.mkdir()
    (at / "results.json").write_text(json.dumps(make_result(None, None, 0, ckpts, data_root, logger)))
    return root


def as_scale(sweep: Path, scale: str, train_subset: int, shift: float = 0.0) -> Path:
    """Turn a :func:`build_sweep` folder into a ``scale=<scale>`` sweep: ``data.train_subset``, its own base
    checkpoints, clean accuracies shifted by ``shift`` and Hydra's ``.hydra/hydra.yaml`` choices per job."""
    for f in sorted(sweep.rglob("results.json")):
        r = json.loads(f.read_text())
        r["config"]["data"]["train_subset"] = train_subset
        for part in ("base", "final"):
            r[part]["clean_acc"] += shift
            r[part]["checkpoint"] = r[part]["checkpoint"].replace("/ckpt/", f"/ckpt-{scale}/")
        f.write_text(json.dumps(r))
        choices = {
            "scale": scale,
            "method": r["method"] or "rift_bn",
            "logger": "csv",
            "hydra/launcher": "basic",
        }
        (f.parent / ".hydra").mkdir()
        (f.parent / ".hydra" / "hydra.yaml").write_text(
            yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}})
        )
    return sweep


@pytest.fixture()
def two_scales(tmp_path: Path) -> Path:
    """Two sweeps of the same seeds 0-2 in one folder: scale=smoke (base 80%) and scale=cpu (base 90%)."""
    root = tmp_path / "all"
    as_scale(build_sweep(root / "smoke"), "smoke", 4000)
    as_scale(build_sweep(root / "cpu"), "cpu", 5000, shift=10.0)
    return root


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> object:
    """One torch thread: on a shared 2-core machine two spinning OpenMP threads are ~50x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    return build_sweep(tmp_path / "sweep")


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, list[str]]:
    """One function-level report over the synthetic sweep (checkpoints absent, so Figure 3 is skipped)."""
    sweep = build_sweep(tmp_path_factory.mktemp("made") / "sweep")
    logs: list[str] = []
    return make_report([sweep], kde=True, wandb=False, log=logs.append), logs


def _with(r: Run, **changes: Any) -> Run:
    """The run with record fields changed (``path`` and ``choices`` change the run itself)."""
    own = {k: changes.pop(k) for k in ("path", "choices") if k in changes}
    return dataclasses.replace(r, results=dataclasses.replace(r.results, **changes), **own)


def _row(df: pd.DataFrame, method: str, k: int | None = None) -> pd.Series:
    sel = df[(df["method"] == method) & (df["k"].isna() if k is None else df["k"] == k)]
    assert len(sel) == 1, sel
    return sel.iloc[0]


# ---------------------------------------------------------------------------------------------- tables


def test_table1_mean_std_n_and_deltas(sweep: Path) -> None:
    runs = load_runs([sweep], log=lambda _: None)
    t = table1(runs)
    assert list(t["method"]) == [
        "base",
        "rift",
        "rift_bn",
        "rift",
        "rift_bn",
    ]  # paper order: base, then per k

    base = _row(t, "base")  # three seeds' bases; the "at" run shares seed 0's base and is not counted twice
    assert base["n"] == 3
    assert base["clean_acc_mean"] == pytest.approx(80.0)
    assert base["clean_acc_std"] == pytest.approx(1.0)  # sample std of 80, 81, 79
    assert math.isnan(base["delta_clean_mean"])

    rift1 = _row(t, "rift", 1)  # clean 81, 83, 85; robust 50.5, 50.5, 49; deltas (1, 2, 6), (0.5, -0.5, 0)
    assert rift1["n"] == 3 and rift1["seeds"] == "0 1 2"
    assert rift1["clean_acc_mean"] == pytest.approx(83.0)
    assert rift1["clean_acc_std"] == pytest.approx(2.0)
    assert rift1["robust_acc_mean"] == pytest.approx(50.0)
    assert rift1["robust_acc_std"] == pytest.approx(math.sqrt(0.75))
    assert rift1["delta_clean_mean"] == pytest.approx(3.0)
    assert rift1["delta_clean_std"] == pytest.approx(math.sqrt(7.0))
    assert rift1["delta_robust_mean"] == pytest.approx(0.0)
    assert rift1["delta_robust_std"] == pytest.approx(0.5)
    assert rift1["alpha_mean"] == pytest.approx(0.5) and rift1["alphas"] == "0.5"
    assert rift1["test_images"] == 100
    assert math.isnan(rift1["paired_clean_delta"])  # version-1 files: no per-image outcomes

    bn1 = _row(t, "rift_bn", 1)
    assert bn1["delta_clean_mean"] == pytest.approx(2.0) and bn1["delta_clean_std"] == pytest.approx(0.0)
    assert bn1["delta_robust_mean"] == pytest.approx(1.0)

    bn2 = _row(t, "rift_bn", 2)  # one seed: std left empty
    assert bn2["n"] == 1 and math.isnan(bn2["clean_acc_std"])
    assert bn2["clean_acc_mean"] == pytest.approx(81.5) and bn2["delta_robust_mean"] == pytest.approx(0.75)

    lt = layer_types_table(runs)
    assert set(lt["method"]) == {"base", "bn_only", "conv_linear_only", "full"}
    assert _row(lt, "full")["delta_robust_mean"] == pytest.approx(-6.0)
    assert _row(lt, "base")["n"] == 1  # only seed 0 has layer-type runs: its base alone
    assert _row(lt, "base")["clean_acc_mean"] == pytest.approx(80.0)
    assert set(t["method"]) == {"base", "rift", "rift_bn"}  # layer types are not in Table 1


def test_markdown_and_csv_files(made: tuple) -> None:
    report, _ = made
    csv = pd.read_csv(report.out / "table1.csv")
    assert {
        "dataset",
        "method",
        "k",
        "clean_acc_mean",
        "clean_acc_std",
        "robust_acc_mean",
        "robust_acc_std",
        "delta_clean_mean",
        "delta_clean_std",
        "delta_robust_mean",
        "delta_robust_std",
        "n",
    } <= set(csv.columns)
    rift1 = csv[(csv["method"] == "rift") & (csv["k"] == 1)].iloc[0]
    assert rift1["clean_acc_mean"] == pytest.approx(83.0) and rift1["delta_clean_std"] == pytest.approx(
        math.sqrt(7)
    )
    assert rift1["n"] == 3
    assert np.isnan(csv[(csv["method"] == "rift") & (csv["k"] == 2)].iloc[0]["clean_acc_std"])
    lt = pd.read_csv(report.out / "layer_types.csv")
    assert set(lt["method"]) == {"base", "bn_only", "conv_linear_only", "full"}
    runs_csv = pd.read_csv(report.out / "runs.csv")
    assert len(runs_csv) == 3 + 11  # 3 bases + 11 fine-tuned runs

    assert {"alphas", "test_images", "paired_clean_delta", "paired_robust_p_value"} <= set(csv.columns)

    md = (report.out / "table1.md").read_text()
    assert "| Top 1 | RiFT | 83.00 ± 2.00 | 50.00 ± 0.87 | n/a | n/a | 0.5 | 3 | 100 |" in md
    assert "|  | Δ RiFT | +3.00 ± 2.65 | +0.00 ± 0.50 |  |  |  |  |  |" in md
    assert "|  | Δ RiFT with BN | +2.00 ± 0.00 | +1.00 ± 0.00 |  |  |  |  |  |" in md
    assert "| Top 2 | RiFT | 80.50 | 49.75 | n/a | n/a | 0.5 | 1 | 100 |" in md  # n = 1: no std
    assert "|  | Base (AT) | 80.00 ± 1.00 | 50.00 ± 1.00 |  |  |  | 3 | 100 |" in md
    assert "| Full | 84.00 | 44.00 | n/a | n/a | 0.8 | 1 | 100 |" in md
    assert "| Δ Full | +4.00 | -6.00 |  |  |  |  |  |" in md
    assert "| α* | n | Test images |" in md and TESTS_NOTE in md
    assert md.index("Top 1") < md.index("Top 2") < md.index("layer type")
    assert "## Fine-tuning by layer type (Figures 1-2): final model after interpolation (alpha* chosen" in md
    assert "| Top 1 | RiFT | 83.00 ± 2.00 |" in md and "## Notes" in md and "duplicate" not in md


def test_fmt() -> None:
    assert fmt(81.454, float("nan")) == "81.45"
    assert fmt(1.0, 0.25, signed=True) == "+1.00 ± 0.25"
    assert fmt(float("nan"), float("nan")) == "–"


def test_duplicate_runs_counted_once(sweep: Path, tmp_path: Path) -> None:
    copy = tmp_path / "rerun" / "0"
    copy.mkdir(parents=True)
    (copy / "results.json").write_text((sweep / "0" / "results.json").read_text())
    notes: list[str] = []
    runs = load_runs([sweep, tmp_path / "rerun", sweep], log=notes.append)
    assert len(runs) == 12 and any("duplicate" in n for n in notes)  # 11 fine-tuned + 1 base-only
    assert _row(table1(runs), "rift", 1)["n"] == 3


def test_duplicate_job_keeps_newest_and_says_so(sweep: Path, tmp_path: Path) -> None:
    """The same job rerun elsewhere (only logger, force and data.root differ) is one seed: the newest copy."""
    r = json.loads((sweep / "0" / "results.json").read_text())  # rift k=1 seed 0: clean 81
    assert (r["method"], r["k"], r["seed"]) == ("rift", 1, 0)
    r["final"]["clean_acc"] = 99.0
    r["config"] |= {"logger": {"name": "wandb", "project": "p"}, "force": True}
    r["config"]["data"]["root"] = "/elsewhere/data"
    rerun = tmp_path / "rerun" / "0" / "results.json"
    rerun.parent.mkdir(parents=True)
    rerun.write_text(json.dumps(r))
    old = (sweep / "0" / "results.json").stat().st_mtime
    os.utime(rerun, (old + 60, old + 60))
    r["config"]["data"]["val_size"] = 60  # a setting that changes numbers: another experiment, not a copy
    other = tmp_path / "other" / "0" / "results.json"
    other.parent.mkdir(parents=True)
    other.write_text(json.dumps(r))

    loaded = load([sweep, tmp_path / "rerun"])
    assert len(loaded.runs) == 12
    (note,) = loaded.notes
    assert note.startswith("duplicate job (2 copies of one config, seed 0): kept the newest ")
    assert str(rerun) in note.split("; ignored ")[0] and str(sweep / "0" / "results.json") in note
    rift1 = _row(table1(loaded.runs), "rift", 1)
    assert rift1["n"] == 3 and rift1["seeds"] == "0 1 2"
    assert rift1["clean_acc_mean"] == pytest.approx((99 + 83 + 85) / 3)  # the newest copy's number

    both = load([sweep, tmp_path / "other"])
    assert not both.notes and len(experiments(both.runs)) == 2
    t = table1(both.runs)
    assert sorted(t.loc[(t["method"] == "rift") & (t["k"] == 1), "n"]) == [1, 3]


def test_a_seed_pooled_twice_is_refused(sweep: Path) -> None:
    runs = load_runs([sweep], log=lambda _: None)
    twice = next(r for r in runs if r.method == "rift" and r.k == 2)
    with pytest.raises(ValueError, match="one run per seed"):
        table1([*runs, twice])


# ------------------------------------------------------------------------------------------ experiments


def _by_label(df: pd.DataFrame, label: str, method: str, k: int | None = None) -> pd.Series:
    return _row(df[df["label"] == label], method, k)


def test_experiments_are_reported_separately(two_scales: Path) -> None:
    """Same seeds, different scale: two experiments with n = 3 each, never one pool with n = 6."""
    runs = load_runs([two_scales], log=lambda _: None)
    exps = experiments(runs)
    assert sorted(e.label for e in exps) == ["scale=cpu", "scale=smoke"]  # train_subset follows from scale
    assert sorted(e.tag for e in exps) == ["cifar10_exp1", "cifar10_exp2"]
    assert all(e.seeds == [0, 1, 2] and len(e.runs) == 12 for e in exps)

    t = table1(runs)
    assert (t["method"] == "base").sum() == 2
    for label, shift in (("scale=smoke", 0.0), ("scale=cpu", 10.0)):
        base = _by_label(t, label, "base")
        assert base["n"] == 3 and base["seeds"] == "0 1 2"
        assert base["clean_acc_mean"] == pytest.approx(80.0 + shift) and base[
            "clean_acc_std"
        ] == pytest.approx(1)
        rift1 = _by_label(t, label, "rift", 1)
        assert rift1["n"] == 3 and rift1["clean_acc_mean"] == pytest.approx(83.0 + shift)
        assert rift1["delta_clean_mean"] == pytest.approx(3.0)
    lt = layer_types_table(runs)
    assert sorted(lt.loc[lt["method"] == "base", "n"]) == [1, 1]

    md = to_markdown(t, lt, runs)
    tag = {e.label: e.tag for e in exps}
    assert f"### CIFAR-10, resnet18 (width 8) · scale=cpu (`{tag['scale=cpu']}`)" in md
    assert "| Top 1 | RiFT | 93.00 ± 2.00 | 50.00 ± 0.87 | n/a | n/a | 0.5 | 3 | 100 |" in md
    assert "| Top 1 | RiFT | 83.00 ± 2.00 | 50.00 ± 0.87 | n/a | n/a | 0.5 | 3 | 100 |" in md
    assert "88.00" not in md  # the pooled RiFT k=1 mean of both scales
    assert f"- `{tag['scale=smoke']}` (scale=smoke): 12 run(s), seeds 0, 1, 2; from " in md

    runs = [_with(r, choices={}) for r in runs]  # without Hydra's choices the label names the config key
    assert sorted(e.label for e in experiments(runs)) == ["data.train_subset=4000", "data.train_subset=5000"]
    wide = [  # a different setting
        _with(r, experiment=dataclasses.replace(r.experiment, width=16)) if "/cpu/" in str(r.path) else r
        for r in runs
    ]
    assert sorted((e.tag, e.label) for e in experiments(wide)) == [
        ("cifar10_resnet18_w16", ""),
        ("cifar10_resnet18_w8", ""),
    ]


def test_figures_per_experiment_and_mixing_refused(two_scales: Path) -> None:
    from rift_bn.report.kde import plan_kde

    runs = load_runs([two_scales], log=lambda _: None)
    with pytest.raises(ValueError, match=r"2 different experiments \(they differ in scale\)"):
        plot_interpolation([r for r in runs if r.method in ("rift", "rift_bn")])
    with pytest.raises(ValueError, match="different experiments"):
        plot_layer_types([r for r in runs if r.method == "full"])
    with pytest.raises(ValueError, match="different experiments"):
        figure_mrc(runs, "rift")
    plan, why = plan_kde(runs)
    assert plan is None and "different experiments" in why

    figures, skipped = report_figures(runs, kde=False, log=lambda _: None)
    tags = sorted(e.tag for e in experiments(runs))
    kinds = ("fig_layer_types_{}", "fig_interpolation_{}", "fig_mrc_{}_rift", "fig_mrc_{}_rift_bn")
    assert sorted(figures) == sorted(kind.format(t) for kind in kinds for t in tags)
    assert skipped == {"fig_bn_kde_cifar10": "--no-kde"}
    cpu = next(e.tag for e in experiments(runs) if e.label == "scale=cpu")
    fig = figures[f"fig_interpolation_{cpu}"]
    assert "scale=cpu" in fig._suptitle.get_text() and "RiFT, k=1 (n=3)" in _legend_texts(fig)
    assert _legend_texts(figures[f"fig_layer_types_{cpu}"]) == ["BN only", "Conv/Linear only", "Full"]  # n=1
    axes = figures[f"fig_layer_types_{cpu}"].get_axes()[:2]  # each panel names its quantity
    assert [ax.get_ylabel() for ax in axes] == ["Clean accuracy (%)", "Robust (PGD) accuracy (%)"]

    # only one experiment of the setting has layer-type runs: its figure keeps the plain stem
    some = [
        r
        for r in runs
        if not ("/cpu/" in str(r.path) and r.method in ("bn_only", "conv_linear_only", "full"))
    ]
    figures, _ = report_figures(some, kde=False, log=lambda _: None)
    assert "fig_layer_types_cifar10" in figures and f"fig_interpolation_{cpu}" in figures


def test_estimators_get_their_own_rows_and_lines(sweep: Path) -> None:
    """A linear-MRC run is its own row and interpolation line, never averaged into the exact-MRC one."""
    runs = load_runs([sweep], log=lambda _: None)
    linear = []
    for r in runs:
        if r.method == "rift" and r.k == 1:
            rows = [dict(row, estimator="linear") for row in r.results.mrc]
            cfg = {**r.results.config, "mrc": {"estimator": "linear"}}
            final = dict(r.results.final, clean_acc=r.results.final["clean_acc"] - 10)
            linear.append(_with(r, mrc=rows, config=cfg, final=final, path=Path(f"{r.path}.linear")))
    assert len(experiments(runs + linear)) == 1
    t = table1(runs + linear)
    k1 = t[(t["method"] == "rift") & (t["k"] == 1)].set_index("estimator")
    assert k1.loc["exact", "clean_acc_mean"] == pytest.approx(83.0) and k1.loc["exact", "n"] == 3
    assert k1.loc["linear", "clean_acc_mean"] == pytest.approx(73.0) and k1.loc["linear", "n"] == 3
    assert "| RiFT (linear MRC) | 73.00 ± 2.00 |" in to_markdown(t, None, runs + linear)
    fig = plot_interpolation([r for r in runs + linear if r.method in ("rift", "rift_bn")])
    assert all(len(ax.lines) == 5 for ax in fig.get_axes())  # (rift, rift_bn) x (k=1, k=2) + linear rift k=1
    assert {"RiFT, k=1 (n=3)", "RiFT, k=1 (linear MRC) (n=3)"} <= set(_legend_texts(fig))


# ------------------------------------------------------------------------------ failed jobs, headings


def test_failed_jobs_are_listed(sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (sweep / "98" / ".hydra").mkdir(parents=True)  # a job that failed before writing results.json
    (sweep / "report" / "0" / ".hydra").mkdir(parents=True)  # inside the report folder: not a job
    monkeypatch.chdir(tmp_path)
    loaded = load([sweep], exclude=sweep / "report")
    assert loaded.missing == [(sweep / "98").resolve()]
    assert loaded.notes == [f"missing: sweep/98 ({MISSING_REASON})"]
    assert MISSING_REASON == "no results.json; the job failed or is still running"
    md = to_markdown(table1(loaded.runs), None, loaded.runs, loaded.notes)
    assert md.rstrip().endswith(f"- missing: sweep/98 ({MISSING_REASON})")


def test_layer_type_heading_follows_the_alphas(sweep: Path) -> None:
    runs = load_runs([sweep], log=lambda _: None)
    lt_runs = [r for r in runs if r.method in ("bn_only", "conv_linear_only", "full")]
    assert final_model_text(lt_runs) == (
        "final model after interpolation (alpha* chosen on the selection split from [0, 0.5, 1])"
    )
    as_tuned = [
        _with(r, config={**r.results.config, "interpolation": {"alphas": [1.0]}})
        if r.method in ("bn_only", "conv_linear_only", "full")
        else r
        for r in runs
    ]
    md = to_markdown(table1(as_tuned), layer_types_table(as_tuned), as_tuned)
    assert (
        "## Fine-tuning by layer type (Figures 1-2): the fine-tuned model itself "
        "(interpolation.alphas = [1.0]: no interpolation)"
    ) in md
    assert "after interpolation" not in md
    one = [_with(r, config={**r.results.config, "interpolation": {"alphas": [0.5]}}) for r in lt_runs]
    assert final_model_text(one).startswith("the model interpolated at alpha = 0.5")


# --------------------------------------------------------------------------------------------- figures


def _legend_texts(fig) -> list[str]:
    return [t.get_text() for lg in fig.legends for t in lg.get_texts() if t.get_text()]


def test_figure_series(sweep: Path) -> None:
    runs = load_runs([sweep], log=lambda _: None)
    lt = [r for r in runs if r.method in ("bn_only", "conv_linear_only", "full")]
    fig = plot_layer_types(lt, "t")
    axes = fig.get_axes()
    assert len(axes) == 2 and all(len(ax.lines) == 3 for ax in axes)
    assert _legend_texts(fig) == ["BN only", "Conv/Linear only", "Full"]
    assert list(axes[0].lines[2].get_xdata()) == [0, 1, 2, 3]  # epoch 0 = base
    assert "%" in axes[0].get_ylabel() and "%" in axes[1].get_ylabel()

    ft = [r for r in runs if r.method in ("rift", "rift_bn")]
    fig = plot_interpolation(ft)
    for ax in fig.get_axes():
        assert len(ax.lines) == 4  # (rift, rift_bn) x (k=1, k=2)
        assert sum(isinstance(c, PathCollection) for c in ax.collections) == 4  # alpha* stars
    assert "RiFT, k=1 (n=3)" in _legend_texts(fig) and r"chosen $\alpha^*$" in _legend_texts(fig)
    mean_clean_k1 = fig.get_axes()[0].lines[0].get_ydata()  # rift k=1: every seed has the same curve
    assert list(mean_clean_k1) == pytest.approx([60.0, 65.0, 70.0])

    fig = figure_mrc(runs, "rift_bn", "mrc")
    ax_mrc, ax_drop = fig.get_axes()
    bars = [c for c in ax_mrc.containers if isinstance(c, BarContainer)]
    assert len(bars) == 1 and len(bars[0]) == 7  # one estimator, 7 candidates
    assert [t.get_text() for t in ax_mrc.texts] == ["1", "2"]  # the k=2 selection: bn1, layer1.0.bn1
    assert ax_mrc.get_yscale() == "log"  # MRC spans 1.7 decades... 0.01 .. 0.5 = 50x
    bold = [t.get_text() for t in ax_drop.get_xticklabels() if t.get_fontweight() == "bold"]
    assert bold == ["bn1", "layer1.0.bn1"]
    assert {"Conv", "Linear", "BN"} <= set(_legend_texts(fig))


def test_mrc_two_estimators_side_by_side(sweep: Path) -> None:
    runs = load_runs([sweep], log=lambda _: None)
    r = next(r for r in runs if r.method == "rift" and r.k == 1 and r.seed == 0)
    linear = _with(
        r,
        mrc=[
            dict(row, mrc=row["mrc"] * 1.1, estimator="linear", robust_acc_drop=None) for row in r.results.mrc
        ],
        config={**r.results.config, "mrc": {"estimator": "linear"}},
    )
    fig = figure_mrc([r, linear], "rift")
    ax_mrc, ax_drop = fig.get_axes()
    assert len(ax_mrc.containers) == 2 and len(ax_drop.containers) == 2
    assert {"exact estimate", "linear estimate"} <= set(_legend_texts(fig))
    direct = plot_mrc({"exact": r.results.mrc, "linear": linear.results.mrc}, ["layer1.0.conv1"])
    assert len(direct.get_axes()[0].containers) == 2


# ---------------------------------------------------------------- Figure 3 (KDE), from the runs' saved data


def _save_bn_outputs(
    sweep: Path, alphas: dict[str, float] | None = None, final_is_base: tuple[str, ...] = ()
) -> torch.Tensor:
    """Give every RiFT / RiFT-with-BN run of the sweep a ``bn_outputs.npz`` (and its record field): tiny
    random ResNet-18s, one base per seed, a final and a fine-tuned model per run (the base itself as final
    for the methods in ``final_is_base``), all on the same examples, which are returned. ``alphas`` sets
    ``{method: alpha*}``."""
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for i, f in enumerate(sorted(sweep.rglob("results.json"))):
        r = json.loads(f.read_text())
        if r["method"] not in ("rift", "rift_bn"):
            continue
        models = []
        for seed in (r["seed"], 100 + i, 200 + i):  # base, final, fine-tuned
            torch.manual_seed(seed)
            models.append(build_model("resnet18", 10, 8))
        if r["method"] in final_is_base:
            models[1] = models[0]
        save_bn_outputs(f.parent / BN_OUTPUTS, dict(zip(MODELS, models, strict=True)), x)
        r["bn_outputs"] = BN_OUTPUTS
        r["alpha"] = (alphas or {}).get(r["method"], r["alpha"])
        f.write_text(json.dumps(r))
    return x


def _no_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on no torch module may run: the report must neither attack nor evaluate a model."""

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the report ran a model")

    monkeypatch.setattr(torch.nn.Module, "__call__", refuse)


def test_bn_kde_and_wandb_from_saved_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rift_bn.report.kde import kde_samples, plan_kde

    sweep = build_sweep(tmp_path / "sweep", logger="wandb")
    _save_bn_outputs(sweep)
    _no_forward(monkeypatch)
    runs = load_runs([sweep], log=lambda _: None)
    plan, why = plan_kde(runs)
    assert plan is not None, why
    assert plan.k == 2 and plan.layers == ["bn1", "layer1.0.bn1"]  # largest k; the BN layers RiFT-BN selected
    samples = kde_samples(plan)
    saved = BNOutputs.read(plan.rift_bn.beside(BN_OUTPUTS))
    assert saved.images == plan.images == 4 and saved.values["base"].shape[1] == VALUES
    assert np.array_equal(samples["bn1"]["init"], saved.of("base", "bn1"))
    assert np.array_equal(samples["bn1"]["RiFT with BN"], saved.of("final", "bn1"))
    rift_saved = BNOutputs.read(plan.rift.beside(BN_OUTPUTS))
    assert np.array_equal(samples["bn1"]["RiFT"], rift_saved.of("final", "bn1"))
    assert np.array_equal(rift_saved.of("base", "bn1"), saved.of("base", "bn1"))  # one base, same examples
    assert list(samples["bn1"]) == ["init", "RiFT", "RiFT with BN", "RiFT (fine-tuned)"]  # RiFT-BN alpha* = 1
    group = "sweep-" + "-".join(sweep.parts[-2:])  # the group rift_bn.loggers gives a sweep's runs
    assert wandb_target(runs) == {
        "project": "rift_bn_test",
        "entity": None,
        "group": group,
        "groups": [group],
    }

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    report = make_report([sweep], kde=True, wandb=True, log=lambda _: None)
    fig = report.figures["fig_bn_kde_cifar10"]
    shown = [ax for ax in fig.get_axes() if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == ["bn1", "layer1.0.bn1"]
    assert all(len(ax.lines) == 4 for ax in shown)  # RiFT with BN at alpha* = 1 is its fine-tuned model
    assert _legend_texts(fig) == [
        "init",
        r"RiFT $\theta(\alpha^*)$, $\alpha^*$=0.5",
        r"RiFT fine-tuned ($\alpha$=1)",
        r"RiFT with BN $\theta(\alpha^*)$, $\alpha^*$=1 = fine-tuned",
    ]
    caption = " ".join(fig._suptitle.get_text().split())
    assert "BN outputs on adversarial examples of 4 selection-split images" in caption
    assert "PGD-10 (eps 8/255, step 2/255, random start), made once on the base model (init)" in caption
    assert "Layers: the BN layers RiFT with BN selected for fine-tuning" in caption
    assert "least robustness-critical" in caption
    assert (report.out / "fig_bn_kde_cifar10.png").read_bytes()[:8] == PNG_MAGIC
    assert "BN output" in shown[0].get_xlabel() and "Density" in shown[0].get_ylabel()

    runs_dirs = list((report.out / "wandb").glob("offline-run-*"))
    assert len(runs_dirs) == 1 and list(runs_dirs[0].glob("run-*.wandb"))
    assert report.wandb_dir == str(runs_dirs[0])
    wandb_cli = Path(sys.executable).parent / "wandb"
    if (
        wandb_cli.exists()
    ):  # read the offline run back: a report-typed run in the sweep's group, table + figures
        records = subprocess.run(
            [str(wandb_cli), "leet", "inspect", "--json", str(runs_dirs[0])], capture_output=True, text=True
        ).stdout
        run = next(json.loads(line)["run"] for line in records.splitlines() if '"type":"run"' in line)
        assert run["job_type"] == "report" and run["run_group"] == group and run["project"] == "rift_bn_test"
        assert (
            "table1" in records and "fig_bn_kde_cifar10" in records and "fig_mrc_cifar10_rift_bn" in records
        )


def test_kde_alpha_star_zero_is_init_and_the_fine_tuned_model_is_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep = build_sweep(tmp_path / "sweep")
    _save_bn_outputs(sweep, alphas={"rift": 0.0, "rift_bn": 0.5}, final_is_base=("rift",))
    _no_forward(monkeypatch)
    runs = load_runs([sweep], log=lambda _: None)
    figures, skipped = report_figures(runs, kde=True, log=lambda _: None)
    assert "fig_bn_kde_cifar10" in figures, skipped
    fig = figures["fig_bn_kde_cifar10"]
    shown = [ax for ax in fig.get_axes() if ax.get_visible()]
    assert all(len(ax.lines) == 5 for ax in shown)
    init, at_star, tuned = (shown[0].lines[i].get_ydata() for i in (0, 1, 3))
    assert np.array_equal(init, at_star)  # alpha* = 0: theta(alpha*) is init, by construction ...
    assert not np.allclose(init, tuned)  # ... while the fine-tuned model itself differs
    assert _legend_texts(fig) == [  # a column per model family
        "init",
        r"RiFT $\theta(\alpha^*)$, $\alpha^*$=0 = init",
        r"RiFT fine-tuned ($\alpha$=1)",
        r"RiFT with BN $\theta(\alpha^*)$, $\alpha^*$=0.5",
        r"RiFT with BN fine-tuned ($\alpha$=1)",
    ]
    caption = " ".join(fig._suptitle.get_text().split())
    assert "finetune.bn_stats: RiFT selected, RiFT with BN selected" in caption


def test_bn_shift_numbers_equal_a_direct_computation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Figure 3 in numbers: per (k, seed) and model, the Wasserstein distance of each shown BN layer's saved
    outputs from the base's, over the base's std, averaged over the layers; exactly 0 for a final model that
    is the base (alpha* = 0); a Markdown row per k in bn_shift.md."""
    from scipy.stats import wasserstein_distance

    from rift_bn.report.kde import bn_shift

    sweep = build_sweep(tmp_path / "sweep")
    _save_bn_outputs(sweep, alphas={"rift": 0.0, "rift_bn": 0.5}, final_is_base=("rift",))
    _no_forward(monkeypatch)
    runs = load_runs([sweep], log=lambda _: None)
    table = bn_shift(runs)
    assert sorted(set(table["k"])) == [1, 2] and len(table) == (3 + 1) * 4  # (k, seed) pairs x 4 models
    assert (table.loc[table["model"] == "RiFT", "shift"] == 0).all()  # theta(alpha*) = the base
    assert (table.loc[table["model"] != "RiFT", "shift"] > 0).all()
    r = next(r for r in runs if r.method == "rift_bn" and r.k == 2)
    saved = BNOutputs.read(r.beside(BN_OUTPUTS))
    layers = [s["name"] for s in r.results.selected if s["type"] == "bn"]
    expected = np.mean(
        [
            wasserstein_distance(b := saved.of("base", n).astype(np.float64), saved.of("finetuned", n))
            / b.std()
            for n in layers
        ]
    )
    row = table[(table["k"] == 2) & (table["model"] == "RiFT with BN (fine-tuned)")]
    assert row["layers"].item() == len(layers) and row["shift"].item() == pytest.approx(expected, rel=1e-12)
    report = make_report([sweep], kde=False, wandb=False, log=lambda _: None)
    md = (report.out / "bn_shift.md").read_text()
    assert "| Top 1 | 0.000 ± 0.000 |" in md and "| Top 2 | 0.000 |" in md
    assert [ln.split(" | ")[0] for ln in md.splitlines() if ln.startswith("| Top")] == [
        "| Top k",
        "| Top 1",
        "| Top 2",
    ]
    assert len(pd.read_csv(report.out / "bn_shift.csv")) == len(table)


def test_kde_skipped_with_one_line_without_saved_outputs(made: tuple, tmp_path: Path) -> None:
    report, logs = made  # version-1 runs: no bn_outputs.npz
    assert "fig_bn_kde_cifar10" not in report.figures
    why = report.skipped["fig_bn_kde_cifar10"]
    assert "saved no BN outputs (written before runs saved Figure 3's data; run it again)" in why
    assert "\n" not in why and any(
        line.startswith("Figure 3 (fig_bn_kde_cifar10) skipped: ") for line in logs
    )

    sweep = build_sweep(tmp_path / "sweep")
    _save_bn_outputs(sweep)
    runs = load_runs([sweep], log=lambda _: None)
    plan = kde_plan(runs)
    plan.rift.beside(BN_OUTPUTS).unlink()
    _, skipped = report_figures(runs, log=lambda _: None)
    assert skipped["fig_bn_kde_cifar10"].startswith("the RiFT run's BN outputs are missing: ")

    x = torch.rand(2, 3, 32, 32)  # the RiFT run fed other examples: its curves would not be comparable
    save_bn_outputs(plan.rift.beside(BN_OUTPUTS), dict.fromkeys(MODELS, build_model("resnet18", 10, 8)), x)
    _, skipped = report_figures(runs, log=lambda _: None)
    assert "saved BN outputs on different adversarial examples" in skipped["fig_bn_kde_cifar10"]


def kde_plan(runs: list[Run]) -> Any:
    from rift_bn.report.kde import plan_kde

    plan, why = plan_kde(runs)
    assert plan is not None, why
    return plan


def test_layer_values_are_outputs_at_fixed_positions() -> None:
    """The same positions for every model and call; each value is the layer's output there."""
    torch.manual_seed(0)
    a, b = build_model("resnet18", 10, 8), build_model("resnet18", 10, 8)
    x = torch.rand(3, 3, 32, 32)
    va = layer_values(a, x, ["bn1", "layer1.0.bn2"], values=50, batch_size=2)
    assert va.shape == (2, 50) and np.array_equal(va, layer_values(a, x, ["bn1", "layer1.0.bn2"], 50, 2))
    assert np.allclose(va, layer_values(a, x, ["bn1", "layer1.0.bn2"], values=50), atol=1e-5)  # one batch
    assert not np.array_equal(va, layer_values(b, x, ["bn1", "layer1.0.bn2"], values=50))
    full: list[torch.Tensor] = []
    hook = a.net.bn1.register_forward_hook(lambda _m, _i, out: full.append(out.detach().flatten()))
    with torch.no_grad():
        a.eval()(x)
    hook.remove()
    positions = np.sort(np.random.default_rng(0).choice(len(full[0]), size=50, replace=False))
    assert np.allclose(va[0], full[0].numpy()[positions])
    with pytest.raises(KeyError, match="conv1"):
        layer_values(a, x, ["conv1"])


def test_make_report_writes_every_file(made: tuple) -> None:
    report, _ = made
    sweep = report.runs[0].path.parents[1]
    assert report.out == (sweep / "report").resolve()  # default: <first DIR>/report
    stems = [
        "fig_layer_types_cifar10",
        "fig_interpolation_cifar10",
        "fig_mrc_cifar10_rift",
        "fig_mrc_cifar10_rift_bn",
    ]
    assert sorted(report.figures) == sorted(stems)
    for stem in stems:
        png, pdf = report.out / f"{stem}.png", report.out / f"{stem}.pdf"
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
        assert pdf.read_bytes()[:4] == b"%PDF"
    assert set(report.skipped) == {"fig_bn_kde_cifar10"}
    assert report.wandb_dir is None  # csv-logged runs: nothing to upload


def test_cli(tmp_path: Path) -> None:
    sweep = build_sweep(tmp_path / "sweep")
    (sweep / "99" / ".hydra").mkdir(parents=True)  # a failed job
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "elsewhere"
    proc = subprocess.run(
        [sys.executable, "-m", "rift_bn.report", str(sweep), "--out", str(out), "--no-kde", "--no-wandb"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"report: {out.resolve()}"
    assert "| Top 1 | RiFT | 83.00 ± 2.00 | 50.00 ± 0.87 | n/a | n/a | 0.5 | 3 | 100 |" in proc.stdout
    assert "skipped fig_bn_kde_cifar10: --no-kde" in proc.stdout
    missing = "missing: sweep/99 (no results.json; the job failed or is still running)"
    assert missing in proc.stdout and missing in (out / "table1.md").read_text()
    for stem in ("fig_layer_types_cifar10", "fig_interpolation_cifar10", "fig_mrc_cifar10_rift_bn"):
        assert (out / f"{stem}.png").read_bytes()[:8] == PNG_MAGIC and (out / f"{stem}.pdf").is_file()
    assert (out / "table1.csv").is_file() and not (sweep / "report").exists()


def test_cli_errors_on_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rift_bn.report.__main__ import main

    assert main([str(tmp_path), "--no-kde", "--no-wandb"]) == 2
    assert "no complete results.json" in capsys.readouterr().err
    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    assert main([str(tmp_path), "--no-kde", "--no-wandb"]) == 2
    assert "(1 job folder(s) without one)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ notebook


def test_notebook_executes(two_scales: Path) -> None:
    """The notebook over two experiments and a failed job: each experiment's numbers, never pooled ones."""
    (two_scales / "cpu" / "99" / ".hydra").mkdir(parents=True)
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(REPO / "notebooks" / "analysis.ipynb", as_version=4)
    old = {k: os.environ.get(k) for k in ("RIFT_BN_SWEEP", "RIFT_BN_KDE", "MPLBACKEND")}
    os.environ.update({"RIFT_BN_SWEEP": str(two_scales), "RIFT_BN_KDE": "0"})
    os.environ.pop("MPLBACKEND", None)
    try:
        client = nbclient.NotebookClient(
            nb, kernel_name="python3", timeout=180, resources={"metadata": {"path": str(REPO / "notebooks")}}
        )
        client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 8  # per experiment: layer types, interpolation, two MRC charts
    text = json.dumps(
        [o.get("data", {}) for o in outputs] + [o.get("text", "") for o in outputs], ensure_ascii=False
    )
    assert "83.00 ± 2.00" in text and "93.00 ± 2.00" in text and "88.00" not in text
    assert "scale=smoke" in text and "missing: " in text and "cpu/99 (no results.json" in text


def test_wandb_disabled_logs_no_report_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sweep = build_sweep(tmp_path / "sweep", logger="wandb")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    lines: list[str] = []
    report = make_report([sweep], kde=False, wandb=True, log=lines.append)
    assert report.wandb_dir is None and not (report.out / "wandb").exists()
    assert "W&B: not logged (WANDB_MODE=disabled)" in lines


# ------------------------------------------------------------------ finetune.bn_stats: rows, not experiments


def _with_bn_stats(sweep: Path, ablation: dict[str, float] | None = None) -> Path:
    """Give the sweep's runs the new keys (RiFT ``all``, RiFT with BN ``selected``); with ``ablation``
    (``{method: clean-accuracy shift}``), add a ``finetune.bn_stats=none`` copy of each run of those
    methods."""
    defaults = {"rift": "all", "rift_bn": "selected"}
    for f in sorted(sweep.rglob("results.json")):
        r = json.loads(f.read_text())
        mode = defaults.get(r["method"] or "", "selected") if r["stage"] == "finetune" else None
        r["bn_stats"] = mode
        r["config"]["finetune"] = {"bn_stats": mode or "selected"}  # ${method.bn_stats} unless overridden
        r["config"]["method"] = {"name": r["method"], "bn_stats": mode or "selected"}
        f.write_text(json.dumps(r))
        if ablation and r["method"] in ablation:
            r["bn_stats"] = r["config"]["finetune"]["bn_stats"] = "none"  # finetune.bn_stats=none
            r["final"]["clean_acc"] += ablation[r["method"]]
            r["delta"]["clean_acc"] += ablation[r["method"]]
            copy = f.parent.with_name(f.parent.name + "-none") / "results.json"
            copy.parent.mkdir()
            copy.write_text(json.dumps(r))
    return sweep


def test_bn_stats_sweep_gives_rows_of_one_experiment(sweep: Path, tmp_path: Path) -> None:
    """RiFT (all) and RiFT with BN (selected) are one experiment; a finetune.bn_stats=none sweep of RiFT
    with BN adds its own rows and lines, never seeds of the selected ones; the caption names the modes."""
    from rift_bn.report.table import write_tables

    _with_bn_stats(sweep, ablation={"rift_bn": -5.0, "full": -1.0})
    runs = load_runs([sweep], log=lambda _: None)
    assert len(runs) == 12 + 4 + 1 and len(experiments(runs)) == 1  # no copy taken for a duplicate job

    t = table1(runs)
    k1 = t[(t["method"] == "rift_bn") & (t["k"] == 1)].set_index("bn_stats")
    assert sorted(k1.index) == ["none", "selected"]
    assert k1.loc["selected", "clean_acc_mean"] == pytest.approx(82.0) and k1.loc["selected", "n"] == 3
    assert k1.loc["none", "clean_acc_mean"] == pytest.approx(77.0) and k1.loc["none", "n"] == 3
    assert k1.loc["none", "delta_clean_mean"] == pytest.approx(-3.0)
    assert list(t.loc[t["method"] == "rift", "bn_stats"]) == ["all", "all"]
    assert list(zip(t["method"], t["bn_stats"], strict=True))[:4] == [
        ("base", ""),
        ("rift", "all"),
        ("rift_bn", "selected"),  # the method's default mode first
        ("rift_bn", "none"),
    ]

    md = to_markdown(t, layer_types_table(runs), runs)
    assert "| Top 1 | RiFT | 83.00 ± 2.00 | 50.00 ± 0.87 | n/a |" in md  # one mode: the plain label
    assert "|  | RiFT with BN (BN stats: selected) | 82.00 ± 1.00 |" in md
    assert "|  | RiFT with BN (BN stats: none) | 77.00 ± 1.00 |" in md
    assert "|  | Δ RiFT with BN (BN stats: none) | -3.00 ± 0.00 |" in md
    assert (
        "BN statistics while fine-tuning: RiFT: every BN layer's running statistics adapt "
        "(finetune.bn_stats=all, as the original RiFT code); RiFT with BN, one row per mode: only the "
        "selected BN layers' running statistics adapt (finetune.bn_stats=selected) or no BN layer's running "
        "statistics adapt (finetune.bn_stats=none)."
    ) in md
    assert "| Full (BN stats: none) | 83.00 |" in md and "| Full (BN stats: selected) | 84.00 |" in md
    assert "Full, one row per mode: only the selected BN layers' running statistics adapt " in md

    write_tables(runs, tmp_path / "out")
    csv = pd.read_csv(tmp_path / "out" / "table1.csv", keep_default_na=False)
    assert set(csv.loc[csv["method"] == "rift_bn", "bn_stats"]) == {"selected", "none"}
    assert "bn_stats" in pd.read_csv(tmp_path / "out" / "runs.csv").columns

    fig = plot_interpolation([r for r in runs if r.method in ("rift", "rift_bn")])
    assert all(len(ax.lines) == 6 for ax in fig.get_axes())  # + rift_bn none at k=1, k=2
    legend = set(_legend_texts(fig))
    assert {"RiFT, k=1 (n=3)", "RiFT with BN (BN stats: none), k=1 (n=3)"} <= legend
    assert "RiFT with BN (BN stats: selected), k=1 (n=3)" in legend
    fig = plot_layer_types([r for r in runs if r.method in ("bn_only", "conv_linear_only", "full")])
    assert _legend_texts(fig) == [
        "BN only",
        "Conv/Linear only",
        "Full (BN stats: selected)",
        "Full (BN stats: none)",
    ]


def test_old_runs_without_bn_stats_read_as_selected(sweep: Path) -> None:
    runs = load_runs([sweep], log=lambda _: None)  # results.json written before bn_stats was recorded
    t = table1(runs)
    assert set(t.loc[t["method"] != "base", "bn_stats"]) == {"selected"}
    md = to_markdown(t, None, runs)
    assert (
        "BN statistics while fine-tuning: RiFT: only the selected BN layers' running statistics adapt "
        "(finetune.bn_stats=selected; it selects no BN layer, so none adapt); RiFT with BN: only the "
        "selected BN layers' running statistics adapt (finetune.bn_stats=selected)."
    ) in md
    assert "BN stats:" not in md


# --------------------------------------------- paired statistics: two fake seeds, computed here by hand

# Which of 10 test images each model gets right (1), per seed; the base is shared by the seed's runs.
BASE_OUT = {
    0: {"clean": "1111100000", "robust": "0000000000"},
    1: {"clean": "1111110000", "robust": "1000000000"},
}
FINAL_OUT = {
    ("rift", 0): {"clean": "1111111100", "robust": "1111100000"},
    ("rift", 1): {"clean": "0111111110", "robust": "1111100000"},
    ("rift_bn", 0): {"clean": "1111100000", "robust": "1110000000"},
    ("rift_bn", 1): {"clean": "1111110000", "robust": "1100000000"},
}
ALPHA_STAR = {("rift", 0): 0.5, ("rift", 1): 1.0, ("rift_bn", 0): 0.0, ("rift_bn", 1): 0.0}


def _bits(text: str) -> np.ndarray:
    return np.array([c == "1" for c in text])


def _mcnemar_by_hand(gained: int, lost: int) -> float:
    """Two-sided exact McNemar: twice the smaller binomial tail of the discordant images, at most 1."""
    n = gained + lost
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2**n)


def write_run(folder: Path, method: str, seed: int, test_index: np.ndarray | None = None) -> Path:
    """A version-2 run of k=1 as a job writes it: results.json (accuracies = the outcomes' means) and
    outcomes.npz from the tables above."""
    folder.mkdir(parents=True)
    base = {m: _bits(BASE_OUT[seed][m]) for m in ("clean", "robust")}
    final = {m: _bits(FINAL_OUT[(method, seed)][m]) for m in ("clean", "robust")}
    index = np.arange(10) if test_index is None else test_index
    write_outcomes(folder / OUTCOMES, index, base, final)
    acc = lambda c, ckpt: {
        "clean_acc": percent(c["clean"]),
        "robust_acc": percent(c["robust"]),
        "checkpoint": ckpt,
    }
    Results(
        experiment=Experiment(
            group="g",
            name="topk",
            stage="finetune",
            dataset="cifar10",
            model="resnet18",
            width=8,
            method=method,
            k=1,
            bn_stats={"rift": "all", "rift_bn": "selected"}[method],
            seed=seed,
        ),
        base=acc(base, f"/ckpt/base-{seed}.pt"),
        final=acc(final, str(folder / "final.pt")),
        test_size=10,
        alpha=ALPHA_STAR[(method, seed)],
        outcomes=OUTCOMES,
        stats=outcome_stats(read_outcomes(folder / OUTCOMES)),
        config={"method": {"name": method}, "logger": {"name": "csv"}},
    ).write(folder / "results.json")
    return folder / "results.json"


@pytest.fixture()
def paired(tmp_path: Path) -> Path:
    """A sweep of RiFT and RiFT with BN at k=1 over seeds 0 and 1, with per-image outcomes."""
    root = tmp_path / "paired"
    root.mkdir()
    (root / "multirun.yaml").write_text("hydra: {}\n")
    for i, (method, seed) in enumerate(FINAL_OUT):
        write_run(root / str(i), method, seed)
    return root


def test_pooled_numbers_equal_a_hand_computation_on_two_fake_seeds(paired: Path) -> None:
    runs = load_runs([paired], log=lambda _: None)
    t = table1(runs)
    rift, bn, base = _row(t, "rift", 1), _row(t, "rift_bn", 1), _row(t, "base")
    # RiFT, clean: seed 0 gains images 5-7, seed 1 gains 6-8 and loses 0: 6 gained, 1 lost of 20
    assert rift["paired_images"] == 20 and rift["paired_clean_delta"] == pytest.approx((6 - 1) / 20 * 100)
    assert rift["paired_clean_p_value"] == pytest.approx(_mcnemar_by_hand(6, 1)) == pytest.approx(0.125)
    # RiFT, robust: 5 + 4 gained, none lost: 45 points, p = 2 / 2^9, significant
    assert rift["paired_robust_delta"] == pytest.approx(45.0)
    assert rift["paired_robust_p_value"] == pytest.approx(_mcnemar_by_hand(9, 0)) == pytest.approx(2 / 2**9)
    # RiFT with BN: clean unchanged (no discordant image: p = 1, CI [0, 0]); robust 3 + 1 gained
    assert (bn["paired_clean_delta"], bn["paired_clean_p_value"]) == (0.0, 1.0)
    assert (bn["paired_clean_ci_low"], bn["paired_clean_ci_high"]) == (0.0, 0.0)
    assert bn["paired_robust_delta"] == pytest.approx(20.0) and bn["paired_robust_p_value"] == pytest.approx(
        _mcnemar_by_hand(4, 0)
    )
    # the interval is the bootstrap over the 20 pooled pairs (each seed's images with their own base)
    before = np.concatenate([_bits(BASE_OUT[s]["clean"]) for s in (0, 1)])
    after = np.concatenate([_bits(FINAL_OUT[("rift", s)]["clean"]) for s in (0, 1)])
    low, high = paired_ci(before, after)
    assert (rift["paired_clean_ci_low"], rift["paired_clean_ci_high"]) == (low, high)
    assert low < rift["paired_clean_delta"] < high
    # mean ± std over seeds stays: clean 80, 80; deltas 30, 20
    assert rift["clean_acc_mean"] == 80.0 and rift["clean_acc_std"] == 0.0
    assert rift["delta_clean_mean"] == pytest.approx(25.0) and rift["delta_clean_std"] == pytest.approx(
        math.sqrt(50)
    )
    assert (rift["alphas"], bn["alphas"], rift["n"], rift["test_images"]) == ("0.5/1", "0", 2, 10)
    assert base["n"] == 2 and math.isnan(base["paired_clean_delta"]) and base["test_images"] == 10

    md = to_markdown(t, None, runs)
    ci = lambda r, m: f"[{r[f'paired_{m}_ci_low']:+.2f}, {r[f'paired_{m}_ci_high']:+.2f}]"
    assert (
        f"| Top 1 | RiFT | 80.00 ± 0.00 | 50.00 ± 0.00 | +25.00 {ci(rift, 'clean')} p=0.12 | "
        f"+45.00 {ci(rift, 'robust')} p=0.0039* | 0.5/1 | 2 | 10 |"  # 2 / 2^9, significant
    ) in md
    p_bn = f"{bn['paired_robust_p_value']:.2g}"
    assert (
        f"| RiFT with BN | 55.00 ± 7.07 | 25.00 ± 7.07 | +0.00 [+0.00, +0.00] p=1 | "
        f"+20.00 {ci(bn, 'robust')} p={p_bn} |" in md
    )
    assert "|  | Base (AT) | 55.00 ± 7.07 | 5.00 ± 7.07 |  |  |  | 2 | 10 |" in md
    assert TESTS_NOTE in md and "exact two-sided McNemar" in md and "p < 0.05" in md


def test_rift_with_bn_vs_rift_paired_on_the_same_images(paired: Path, tmp_path: Path) -> None:
    from rift_bn.report.table import rift_vs_rift_bn

    runs = load_runs([paired], log=lambda _: None)
    df, notes = rift_vs_rift_bn(runs)
    (row,) = df.to_dict("records")
    assert not notes and (row["k"], row["n"], row["seeds"], row["test_images"]) == (1, 2, "0 1", 10)
    # clean: seed 0 RiFT with BN misses 5-7 that RiFT gets; seed 1 gets 0 and misses 6-8: 1 gained, 6 lost
    assert row["paired_clean_delta"] == pytest.approx(-25.0)
    assert row["paired_clean_p_value"] == pytest.approx(_mcnemar_by_hand(1, 6))
    # robust: 2 + 3 lost, none gained
    assert row["paired_robust_delta"] == pytest.approx(-25.0)
    assert row["paired_robust_p_value"] == pytest.approx(_mcnemar_by_hand(0, 5)) == pytest.approx(0.0625)
    before = np.concatenate([_bits(FINAL_OUT[("rift", s)]["robust"]) for s in (0, 1)])
    after = np.concatenate([_bits(FINAL_OUT[("rift_bn", s)]["robust"]) for s in (0, 1)])
    assert (row["paired_robust_ci_low"], row["paired_robust_ci_high"]) == paired_ci(before, after)

    # seed 1's RiFT-with-BN run scored other test images: seed 1 is left out of the pair, said in a note
    other = paired / "3"  # rift_bn, seed 1
    arrays = read_outcomes(other / OUTCOMES)
    write_outcomes(
        other / OUTCOMES,
        arrays["test_index"] + 10,
        {m: arrays[f"base_{m}"] for m in ("clean", "robust")},
        {m: arrays[f"final_{m}"] for m in ("clean", "robust")},
    )
    runs = load_runs([paired], log=lambda _: None)
    df, notes = rift_vs_rift_bn(runs)
    assert list(df["n"]) == [1] and list(df["seeds"]) == ["0"]
    assert notes == [
        "RiFT with BN vs RiFT, cifar10: left out k=1 seed 1 "
        "(the two runs were scored on different test images)"
    ]
    report = make_report([paired], tmp_path / "out", kde=False, wandb=False, log=lambda _: None)
    md = (report.out / "table1.md").read_text()
    assert "## RiFT with BN vs RiFT, paired on the same test images" in md and notes[0] in md
    assert "| Top 1 | RiFT with BN − RiFT | 1 | 10 | " in md
    assert pd.read_csv(report.out / "rift_vs_rift_bn.csv")["n"].tolist() == [1]


def test_cli_prints_the_paired_columns(
    paired: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rift_bn.report.__main__ import main

    assert main([str(paired), "--out", str(tmp_path / "out"), "--no-kde", "--no-wandb"]) == 0
    out = capsys.readouterr().out
    assert "| Δ clean, paired [95% CI] | Δ robust, paired [95% CI] | α* | n | Test images |" in out
    p = _mcnemar_by_hand(9, 0)  # pooled over the two seeds: 9 images gained, none lost (printed as p=...)
    assert "| +45.00 [" in out and f"] p={p:.2g}* | 0.5/1 | 2 | 10 |" in out
    assert "| Top 1 | RiFT with BN − RiFT | 2 | 10 | -25.00 [" in out
    runs_csv = pd.read_csv(tmp_path / "out" / "runs.csv")  # each run's own statistics, as the job wrote them
    rift0 = runs_csv[(runs_csv["method"] == "rift") & (runs_csv["seed"] == 0)].iloc[0]
    assert rift0["paired_clean_delta"] == pytest.approx(30.0)
    assert rift0["paired_clean_p_value"] == pytest.approx(_mcnemar_by_hand(3, 0))


def test_outcomes_that_disagree_with_the_record_are_not_used(paired: Path) -> None:
    path = paired / "0" / "results.json"  # rift, seed 0
    d = json.loads(path.read_text())
    d["final"]["clean_acc"] = 99.0  # a stale outcomes.npz beside it
    path.write_text(json.dumps(d))
    loaded = load([paired])
    assert loaded.notes == [
        f"no paired statistics for {path}: {path.parent / OUTCOMES}: final_clean disagrees with results.json "
        "(a stale copy?)"
    ]
    t = table1(loaded.runs)
    assert math.isnan(_row(t, "rift", 1)["paired_clean_delta"])  # the cell: n/a, never half its seeds
    assert not math.isnan(_row(t, "rift_bn", 1)["paired_clean_delta"])


def test_old_and_foreign_results_files(sweep: Path) -> None:
    """Version-1 files (no schema_version) load with their experiment computed; a file of another version is
    refused in one line, and the other runs are reported."""
    runs = load_runs([sweep], log=lambda _: None)
    assert {r.experiment.group for r in runs} == {
        experiment_key(json.loads((sweep / "0" / "results.json").read_text()))
    }
    assert {r.bn_stats for r in runs if r.method} == {"selected"}  # before bn_stats was recorded
    foreign = sweep / "0" / "results.json"
    foreign.write_text(json.dumps(json.loads(foreign.read_text()) | {"schema_version": 3}))
    loaded = load([sweep])
    assert len(loaded.runs) == 11
    (note,) = loaded.notes
    assert (
        note.startswith(f"skipped {foreign}: schema_version=3: written by another rift_bn")
        and "\n" not in note
    )


# ------------------------------------------------------------ the job's Figure 3 data (bn_outputs.npz)


def _fake_job(tmp_path: Path, selection: str = "mrc") -> Any:
    """What save_job_bn_outputs reads of a job: config, selection split, cache keys, device, folders."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from rift_bn.pipeline.training import Timings

    cfg = OmegaConf.create(
        {
            "method": {"selection": selection},
            "mrc": {"num_examples": None},
            "attack": {"eps": "8/255", "alpha": "2/255", "steps": 1, "random_start": True, "restarts": 1},
            "eval": {"batch_size": 4},
            "seed": 0,
        }
    )
    g = torch.Generator().manual_seed(1)
    dm = SimpleNamespace(
        val_x=torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g),
        val_y=torch.randint(0, 10, (6,), generator=g),
    )
    keys = SimpleNamespace(adversarial_set_path=lambda h, n: tmp_path / "cache" / "adv" / f"{h}-{n}.pt")
    for d in ("out", "state"):
        (tmp_path / d).mkdir(parents=True)
    return SimpleNamespace(
        cfg=cfg,
        dm=dm,
        keys=keys,
        training=SimpleNamespace(device=torch.device("cpu")),
        timings=Timings(),
        output_dir=tmp_path / "out",
        state_dir=tmp_path / "state",
    )


def test_the_job_saves_figure_3_data_on_the_mrc_adversarial_set(tmp_path: Path) -> None:
    from rift_bn import cache
    from rift_bn.models.checkpoint import save_state_dict
    from rift_bn.report.bn_outputs import save_job_bn_outputs

    job = _fake_job(tmp_path)
    torch.manual_seed(0)
    base, final, tuned = (build_model("resnet18", 10, 8) for _ in range(3))
    save_state_dict(tuned, tmp_path / "finetuned.pt")
    rng = torch.get_rng_state()
    field = save_job_bn_outputs(job, base, final, "abc", str(tmp_path / "finetuned.pt"))
    assert field == {"bn_outputs": BN_OUTPUTS} and "bn_outputs" in job.timings
    assert torch.equal(torch.get_rng_state(), rng)  # the job's random stream is untouched: no number moves
    adv = cache.load_tensors(tmp_path / "cache" / "adv" / "abc-6.pt")["x"]  # the MRC set, made and cached
    saved = BNOutputs.read(job.output_dir / BN_OUTPUTS)
    assert (job.state_dir / BN_OUTPUTS).read_bytes() == (job.output_dir / BN_OUTPUTS).read_bytes()
    assert saved.layers == [n for n, _, _ in candidate_modules(base, {"bn"})] and saved.images == 6
    assert saved.values["base"].shape == (len(saved.layers), VALUES)
    for who, model in (("base", base), ("final", final), ("finetuned", tuned)):
        want = layer_values(model, adv, saved.layers)  # one batch, where the job ran batches of 4
        assert np.allclose(saved.values[who], want, rtol=1e-3, atol=1e-3)  # float16
    assert (job.output_dir / BN_OUTPUTS).stat().st_size < 400_000

    # a cached adversarial set is read, never attacked again; a layer-type job saves nothing
    job2 = _fake_job(tmp_path / "again")
    (tmp_path / "again" / "cache" / "adv").mkdir(parents=True, exist_ok=True)
    cache.save_tensors(tmp_path / "again" / "cache" / "adv" / "abc-6.pt", {"x": adv, "y": job2.dm.val_y})
    with pytest.MonkeyPatch.context() as m:
        m.setattr("rift_bn.attacks.PGD.__call__", lambda *_: pytest.fail("attacked again"))
        save_job_bn_outputs(job2, base, final, "abc", str(tmp_path / "finetuned.pt"))
    assert BNOutputs.read(job2.output_dir / BN_OUTPUTS).examples == saved.examples
    assert save_job_bn_outputs(_fake_job(tmp_path / "lt", "all"), base, final, "abc", "") == {}
    assert not (tmp_path / "lt" / "out" / BN_OUTPUTS).exists()


# ------------------------------------------------- the same tags everywhere, several sweeps, no hidden curves


def test_experiment_tags_do_not_depend_on_the_folder_order(two_scales: Path) -> None:
    """``report A B``, ``report B A``, ``report <parent>`` and the notebook name the experiments alike."""
    tags = [
        [(e.tag, e.label) for e in experiments(load(dirs).runs)]
        for dirs in (
            [two_scales],
            [two_scales / "smoke", two_scales / "cpu"],
            [two_scales / "cpu", two_scales / "smoke"],
        )
    ]
    assert tags[0] == tags[1] == tags[2] == [("cifar10_exp1", "scale=cpu"), ("cifar10_exp2", "scale=smoke")]


def test_a_report_over_several_sweeps_goes_to_the_first_and_its_group(tmp_path: Path) -> None:
    import shutil

    a = as_scale(build_sweep(tmp_path / "a" / "s1", logger="wandb"), "smoke", 4000)
    b = as_scale(build_sweep(tmp_path / "b" / "s2", logger="wandb"), "cpu", 5000)
    for job in ("1", "2", "3"):  # b has more runs: the most common group is b's
        shutil.rmtree(a / job)
    runs = load([b, a]).runs
    group = {s: "sweep-" + "-".join(s.parts[-2:]) for s in (a, b)}
    assert wandb_target(runs)["group"] == group[b]
    assert wandb_target(runs, a)["group"] == group[a] and wandb_target(runs, b)["group"] == group[b]
    assert wandb_target(runs, a)["groups"] == sorted(group.values())
    report = make_report([a, b], kde=False, wandb=False, log=lambda _: None)
    assert report.out == (a / "report").resolve() and (a / "report" / "table1.md").is_file()
    assert not (b / "report").exists()


def test_equal_interpolation_curves_and_stars_stay_visible(sweep: Path) -> None:
    curve = [{"alpha": a, "clean_acc": 60 + a, "robust_acc": 40 - a} for a in (0.0, 0.5, 1.0)]
    runs = [  # every series the same curve and the same alpha*: they used to hide each other
        _with(r, interpolation=curve, alpha=0.5)
        for r in load_runs([sweep], log=lambda _: None)
        if r.method in ("rift", "rift_bn")
    ]
    fig = plot_interpolation(runs)
    for ax in fig.get_axes():
        xs = [tuple(np.round(line.get_xdata(), 6)) for line in ax.lines]
        assert len(set(xs)) == len(xs) == 4  # each line offset sideways
        assert max(abs(x - a) for line in xs for x, a in zip(line, (0.0, 0.5, 1.0), strict=True)) <= 0.03
        markers = {line.get_marker() for line in ax.lines if line.get_color()}
        assert len(markers) >= 2
        stars = [tuple(c.get_offsets()[0]) for c in ax.collections if isinstance(c, PathCollection)]
        assert len(stars) == 4 and len(set(stars)) == 4
    assert any("offset" in t for t in _legend_texts(fig))


def test_interpolation_axis_labels_clear_the_title_with_a_long_legend(sweep: Path) -> None:
    """Ten curves (both methods, k = 1..5) make a five-row legend: the figure grows so that each panel's
    y label stays below the title and above the legend."""
    runs = [r for r in load_runs([sweep], log=lambda _: None) if r.method in ("rift", "rift_bn")]
    many = [
        _with(r, experiment=dataclasses.replace(r.results.experiment, k=k))
        for r in {r.method: r for r in runs}.values()
        for k in range(1, 6)
    ]
    fig = plot_interpolation(many)
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)  # constrained layout places the axes
    title = fig._suptitle.get_window_extent(renderer)
    legend = fig.legends[0].get_window_extent(renderer)
    labels = [ax.yaxis.label.get_window_extent(renderer) for ax in fig.get_axes()]
    assert len(labels) == 2 and sum("k=" in t for t in _legend_texts(fig)) == 10
    for box in labels:
        assert box.y1 < title.y0 and box.y0 > legend.y1


def test_readme_headless_notebook_command_works(two_scales: Path) -> None:
    """The README's one-line headless run of the notebook on a sweep folder: the executed copy lands there."""
    import re
    import shlex

    jupyter = Path(sys.executable).parent / "jupyter"
    if not jupyter.exists() or not (Path(sys.executable).parent / "jupyter-execute").exists():
        pytest.skip("jupyter execute (nbclient) is not installed beside this python")
    line = next(
        ln.strip()
        for ln in (REPO / "README.md").read_text().splitlines()
        if "jupyter execute notebooks/" in ln
    )
    line = re.sub(r"^S=\S+;", f"S={shlex.quote(str(two_scales))};", line).replace(
        ".venv/bin/jupyter", str(jupyter)
    )
    env = {**os.environ, "RIFT_BN_KDE": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", "-c", line], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    executed = json.loads((two_scales / "analysis.ipynb").read_text())
    outputs = [o for c in executed["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert outputs and not [o for o in outputs if o.get("output_type") == "error"]
    assert "cifar10_exp1: " in json.dumps(outputs)
