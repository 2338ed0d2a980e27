"""rift_bn.report: Table 1 numbers (mean, sample std, n, deltas), figures, CLI, W&B upload, notebook."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection
from matplotlib.container import BarContainer

from rift_bn.report.build import figure_mrc, make_report
from rift_bn.report.collect import load_runs, wandb_target
from rift_bn.report.figures import plot_interpolation, plot_layer_types, plot_mrc
from rift_bn.report.table import fmt, layer_types_table, table1

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
    """A results.json with the documented schema and the known numbers above."""
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


def _write_checkpoints(sweep: Path) -> None:
    """Tiny random ResNet-18 (width 8) checkpoints wherever the sweep's results point."""
    import torch

    from rift_bn.models import build_model
    from rift_bn.models.checkpoint import save_state_dict

    for i, f in enumerate(sorted(sweep.rglob("results.json"))):
        r = json.loads(f.read_text())
        for part in ("base", "final"):
            path = Path(r[part]["checkpoint"])
            if not path.exists():
                torch.manual_seed(100 + i + (part == "final"))
                save_state_dict(build_model("resnet18", 10, 8), path)


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
    assert rift1["alpha_mean"] == pytest.approx(0.5)

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

    md = (report.out / "table1.md").read_text()
    assert "| Top 1 | RiFT | 83.00 ± 2.00 | 50.00 ± 0.87 | 3 |" in md
    assert "|  | Δ RiFT | +3.00 ± 2.65 | +0.00 ± 0.50 |  |" in md
    assert "|  | Δ RiFT with BN | +2.00 ± 0.00 | +1.00 ± 0.00 |  |" in md
    assert "| Top 2 | RiFT | 80.50 | 49.75 | 1 |" in md  # n = 1: no std
    assert "|  | Base (AT) | 80.00 ± 1.00 | 50.00 ± 1.00 | 3 |" in md
    assert "| Full | 84.00 | 44.00 | 1 |" in md and "| Δ Full | +4.00 | -6.00 |  |" in md
    assert md.index("Top 1") < md.index("Top 2") < md.index("layer type")


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


# --------------------------------------------------------------------------------------------- figures


def _legend_texts(fig) -> list[str]:
    return [t.get_text() for lg in fig.legends for t in lg.get_texts() if t.get_text()]


def test_figure_series(sweep: Path) -> None:
    runs = load_runs([sweep], log=lambda _: None)
    lt = [r for r in runs if r["method"] in ("bn_only", "conv_linear_only", "full")]
    fig = plot_layer_types(lt, "t")
    axes = fig.get_axes()
    assert len(axes) == 2 and all(len(ax.lines) == 3 for ax in axes)
    assert _legend_texts(fig) == ["BN only", "Conv/Linear only", "Full"]
    assert list(axes[0].lines[2].get_xdata()) == [0, 1, 2, 3]  # epoch 0 = base
    assert "%" in axes[0].get_ylabel() and "%" in axes[1].get_ylabel()

    ft = [r for r in runs if r["method"] in ("rift", "rift_bn")]
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
    r = next(r for r in runs if r["method"] == "rift" and r["k"] == 1 and r["seed"] == 0)
    linear = dict(
        r,
        mrc=[dict(row, mrc=row["mrc"] * 1.1, estimator="linear", robust_acc_drop=None) for row in r["mrc"]],
        config={**r["config"], "mrc": {"estimator": "linear"}},
    )
    fig = figure_mrc([r, linear], "rift")
    ax_mrc, ax_drop = fig.get_axes()
    assert len(ax_mrc.containers) == 2 and len(ax_drop.containers) == 2
    assert {"exact estimate", "linear estimate"} <= set(_legend_texts(fig))
    direct = plot_mrc({"exact": r["mrc"], "linear": linear["mrc"]}, ["layer1.0.conv1"])
    assert len(direct.get_axes()[0].containers) == 2


# ------------------------------------------------------------------------------------ Figure 3 (KDE)


def test_bn_kde_and_wandb_from_checkpoints(
    tmp_path: Path, tiny_cifar: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rift_bn.report.kde import plan_kde

    sweep = build_sweep(tmp_path / "sweep", data_root=tiny_cifar, logger="wandb")
    _write_checkpoints(sweep)
    runs = load_runs([sweep], log=lambda _: None)
    plan, why = plan_kde(runs)
    assert plan is not None, why
    assert plan.k == 2 and plan.layers == ["bn1", "layer1.0.bn1"]  # largest k; the BN layers RiFT-BN selected
    group = "sweep-" + "-".join(sweep.parts[-2:])  # the group rift_bn.loggers gives a sweep's runs
    assert wandb_target(runs) == {
        "project": "rift_bn_test",
        "entity": None,
        "group": group,
        "groups": [group],
    }

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    report = make_report([sweep], kde=True, wandb=True, kde_images=20, device="cpu", log=lambda _: None)
    fig = report.figures["fig_bn_kde_cifar10"]
    shown = [ax for ax in fig.get_axes() if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == ["bn1", "layer1.0.bn1"]
    assert all(len(ax.lines) == 3 for ax in shown)
    assert _legend_texts(fig) == ["init", r"RiFT ($\alpha^*$=0.5)", r"RiFT with BN ($\alpha^*$=1)"]
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


def test_bn_kde_samples_match_for_equal_models(tmp_path: Path, tiny_cifar: Path) -> None:
    from rift_bn.report.kde import KDEPlan, bn_outputs, kde_samples

    sweep = build_sweep(tmp_path / "sweep", data_root=tiny_cifar)
    runs = load_runs([sweep], log=lambda _: None)
    rift = next(r for r in runs if r["method"] == "rift" and r["k"] == 1 and r["seed"] == 0)
    rift_bn = next(r for r in runs if r["method"] == "rift_bn" and r["k"] == 1 and r["seed"] == 0)
    _write_checkpoints(sweep)
    Path(rift["final"]["checkpoint"]).write_bytes(
        Path(rift_bn["base"]["checkpoint"]).read_bytes()
    )  # RiFT = init
    samples = kde_samples(KDEPlan(rift, rift_bn, ["layer1.0.bn2"]), n_images=8, max_values=500, device="cpu")
    v = samples["layer1.0.bn2"]
    assert len(v["init"]) == 500 and np.array_equal(
        v["init"], v["RiFT"]
    )  # same images, attack seed, positions
    assert not np.array_equal(v["init"], v["RiFT with BN"])

    import torch

    from rift_bn.models import build_model

    out = bn_outputs(build_model("resnet18", 10, 8), torch.zeros(2, 3, 32, 32), ["bn1", "linear"])
    assert out["bn1"].numel() == 2 * 8 * 32 * 32 and out["linear"].numel() == 2 * 10


def test_kde_skipped_with_reason_when_checkpoints_missing(made: tuple) -> None:
    report, logs = made
    assert "fig_bn_kde_cifar10" not in report.figures
    assert "checkpoint missing" in report.skipped["fig_bn_kde_cifar10"]
    assert any("Figure 3" in line for line in logs)


def test_make_report_writes_every_file(made: tuple) -> None:
    report, _ = made
    sweep = Path(report.runs[0]["_path"]).parents[1]
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
    assert "| Top 1 | RiFT | 83.00 ± 2.00 | 50.00 ± 0.87 | 3 |" in proc.stdout
    assert "skipped fig_bn_kde_cifar10: --no-kde" in proc.stdout
    for stem in ("fig_layer_types_cifar10", "fig_interpolation_cifar10", "fig_mrc_cifar10_rift_bn"):
        assert (out / f"{stem}.png").read_bytes()[:8] == PNG_MAGIC and (out / f"{stem}.pdf").is_file()
    assert (out / "table1.csv").is_file() and not (sweep / "report").exists()


def test_cli_errors_on_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rift_bn.report.__main__ import main

    assert main([str(tmp_path), "--no-kde", "--no-wandb"]) == 2
    assert "no complete results.json" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ notebook


def test_notebook_executes(sweep: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(REPO / "notebooks" / "analysis.ipynb", as_version=4)
    old = {k: os.environ.get(k) for k in ("RIFT_BN_SWEEP", "RIFT_BN_KDE", "MPLBACKEND")}
    os.environ.update({"RIFT_BN_SWEEP": str(sweep), "RIFT_BN_KDE": "0"})
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
    assert len(images) >= 4  # layer types, interpolation, two MRC charts
    text = json.dumps([o.get("data", {}) for o in outputs], ensure_ascii=False)
    assert "83.00 ± 2.00" in text
