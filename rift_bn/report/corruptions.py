"""Distribution shift (``eval.corruptions``): the mean corruption accuracy per method and k with deltas
against the base model (``corruptions.md`` / ``corruptions.csv``), and a corruption x severity heatmap per
experiment (``fig_corruptions_<tag>``).

Numbers come from each run's record (:attr:`rift_bn.results.Results.corruptions`): accuracy (%) on the test
images corrupted as in CIFAR-10-C / CIFAR-100-C; the mean over every corruption and severity is RiFT's
summary number. Runs are pooled over seeds within one experiment, as in Table 1: mean, sample std (ddof=1,
empty for one seed) and n; a delta is taken per run (its final model minus its own base), then averaged.
Runs without corruption results are left out; a report without any writes neither file nor figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from rift_bn.report.collect import (
    LAYER_TYPE_METHODS,
    METHOD_LABELS,
    TOPK_METHODS,
    Run,
    bn_stats_label,
    bn_stats_order,
    check_one_experiment,
    experiments,
    setting_label,
)
from rift_bn.report.figures import style
from rift_bn.report.table import fmt
from rift_bn.results import Corruptions

__all__ = [
    "METRIC_LABELS",
    "corruption_runs_table",
    "corruption_table",
    "figure_corruptions",
    "to_markdown",
    "write_corruption_tables",
]

METRIC_LABELS: dict[str, str] = {"clean_acc": "clean", "robust_acc": "PGD"}  # PGD: eval.corruptions_attack
METHOD_ORDER: tuple[str, ...] = ("base", *TOPK_METHODS, *LAYER_TYPE_METHODS)
ROW: list[str] = ["method", "bn_stats", "k", "estimator"]  # a row of the table within an experiment
BASE_ROW: dict[str, object] = {"method": "base", "bn_stats": "", "k": None, "estimator": ""}


def _with_corruptions(runs: Sequence[Run]) -> list[tuple[Run, Corruptions]]:
    return [(r, c) for r in runs if (c := r.results.corruptions) is not None]


def _row(r: Run) -> dict[str, object]:
    """The table row of a fine-tuned run: its method, BN-statistics mode, k and MRC estimator."""
    return {"method": r.method, "bn_stats": r.bn_stats, "k": r.k, "estimator": r.row_estimator}


def _metrics(df: pd.DataFrame) -> list[str]:
    """The metrics ``df`` (per run or pooled) has values of."""
    return [m for m in METRIC_LABELS if any(c.startswith(m) and df[c].notna().any() for c in df.columns)]


def corruption_runs_table(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per fine-tuned run with corruption results, after one ``method="base"`` row per (experiment,
    seed): the mean corruption accuracy of each metric measured (``clean_acc``, ``robust_acc``) and, for
    fine-tuned runs, ``delta_<metric>`` against the run's own base."""
    rows: list[dict] = []
    for e in experiments(runs):
        bases: dict[int, dict] = {}
        tuned: list[dict] = []
        for r, c in _with_corruptions(e.runs):
            common = {
                "experiment": e.tag,
                "title": setting_label(e.setting) + (f" · {e.label}" if e.label else ""),
                "seed": r.seed,
                "corruptions": len(c["base"]["clean_acc"]),
                "images": c["images"],
                "path": str(r.path),
            }
            bases.setdefault(r.seed, common | BASE_ROW | c["mean"]["base"])
            if r.method:
                delta = {f"delta_{m}": v for m, v in c["mean"]["delta"].items()}
                tuned.append(common | _row(r) | c["mean"]["final"] | delta)
        rows += [*(bases[s] for s in sorted(bases)), *tuned]
    return pd.DataFrame(rows)


def corruption_table(runs: Sequence[Run]) -> pd.DataFrame:
    """:func:`corruption_runs_table` pooled over seeds: ``<metric>_mean``/``_std`` and
    ``delta_<metric>_mean``/``_std``, ``n`` (distinct seeds) and ``seeds``; per experiment the base row
    first, then by k, method and BN-statistics mode. Empty without corruption results."""
    per_run = corruption_runs_table(runs)
    if per_run.empty:
        return per_run
    values = [c for m in _metrics(per_run) for c in (m, f"delta_{m}") if c in per_run]
    out: list[dict] = []
    keyed = per_run.assign(_k=per_run["k"].fillna(-1))
    for _, g in keyed.groupby(["experiment", "method", "bn_stats", "_k", "estimator"], sort=False):
        row = g.iloc[0][["experiment", "title", *ROW, "corruptions", "images"]].to_dict()
        for c in values:
            vals = g[c].to_numpy(dtype=float)
            row[f"{c}_mean"] = float(vals.mean()) if not np.isnan(vals).all() else np.nan
            row[f"{c}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else np.nan
        row["n"] = g["seed"].nunique()
        row["seeds"] = " ".join(str(s) for s in sorted(g["seed"]))
        out.append(row)
    df = pd.DataFrame(out)
    order = {tag: i for i, tag in enumerate(dict.fromkeys(df["experiment"]))}
    df = df.assign(
        _e=df["experiment"].map(order),
        _k=df["k"].fillna(0),
        _m=[METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER) for m in df["method"]],
        _b=[bn_stats_order(m, b) for m, b in zip(df["method"], df["bn_stats"], strict=True)],
    )
    df = df.sort_values(["_e", "_k", "_m", "_b", "estimator"]).drop(columns=["_e", "_k", "_m", "_b"])
    return df.astype({"k": "Int64"}).reset_index(drop=True)


def _several_modes(table: pd.DataFrame) -> set[str]:
    """Methods of the table's fine-tuned rows that occur with more than one BN-statistics mode."""
    tuned = table[table["method"] != "base"]
    return {m for m, modes in tuned.groupby("method")["bn_stats"] if modes.nunique() > 1}


def _label(row: pd.Series, several: set[str]) -> str:
    label = METHOD_LABELS.get(row["method"], row["method"])
    label += bn_stats_label(row["bn_stats"]) if row["method"] in several else ""
    return label + (f" ({row['estimator']} MRC)" if row["estimator"] not in ("", "exact") else "")


def to_markdown(table: pd.DataFrame) -> str:
    """:func:`corruption_table` as Markdown, one section per experiment."""
    lines = [
        "## Common corruptions: mean accuracy over every corruption and severity",
        "",
        "Accuracy (%) on the test images corrupted as in CIFAR-10-C / CIFAR-100-C (Hendrycks & Dietterich): "
        "the mean over every corruption and severity (RiFT's summary number; eval.corruptions). Δ = "
        "fine-tuned minus its own base, per seed; mean ± sample std (ddof=1) over n distinct seeds (std "
        "omitted when n = 1). Nothing is selected on these images.",
    ]
    for _, g in table.groupby("experiment", sort=False):
        first, metrics, several = g.iloc[0], _metrics(g), _several_modes(g)
        header = [f"{what} {METRIC_LABELS[m]}" for m in metrics for what in ("Acc. (%)", "Δ")]
        lines += [
            "",
            f"### {first['title']}",
            "",
            f"{first['corruptions']} corruptions x 5 severities, {first['images']} images each.",
            "",
            "| " + " | ".join(["Top k", "Method", *header, "n"]) + " |",
            "|---|---|" + "---:|" * (len(header) + 1),
        ]
        last_k = None
        for _, row in g.iterrows():
            k = "" if pd.isna(row["k"]) or row["k"] == last_k else f"Top {row['k']}"
            last_k = last_k if pd.isna(row["k"]) else row["k"]
            cells = [k, _label(row, several)]
            for m in metrics:
                cells.append(fmt(row[f"{m}_mean"], row[f"{m}_std"]))
                base = row["method"] == "base"
                cells.append("–" if base else fmt(row[f"delta_{m}_mean"], row[f"delta_{m}_std"], signed=True))
            lines.append("| " + " | ".join([*cells, str(row["n"])]) + " |")
    return "\n".join(lines) + "\n"


def write_corruption_tables(runs: Sequence[Run], out: Path) -> list[Path]:
    """``corruptions.md`` and ``corruptions.csv`` in ``out`` when some run has corruption results (else
    nothing); returns the files written."""
    table = corruption_table(runs)
    if table.empty:
        return []
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "corruptions.md", out / "corruptions.csv"]
    files[0].write_text(to_markdown(table))
    table.to_csv(files[1], index=False)
    return files


def _grid(by_name: dict[str, dict[str, float]]) -> pd.DataFrame:
    """``{corruption: {severity: acc}}`` as a frame: a row per corruption (in order), a column per
    severity."""
    grid = pd.DataFrame.from_dict(by_name, orient="index")
    return grid[sorted(grid.columns, key=int)]


def _mean(grids: list[pd.DataFrame]) -> pd.DataFrame:
    return sum(grids[1:], grids[0]) / len(grids)


def figure_corruptions(runs: Sequence[Run], title: str = "") -> Figure | None:
    """The corruption x severity heatmap of one experiment: the base model's accuracy (mean over seeds),
    then per table row (method, k) the final model's change against its own base (mean over seeds), one
    row of panels per metric measured. ``None`` when no run has corruption results."""
    check_one_experiment(runs, "figure_corruptions")
    found = _with_corruptions(runs)
    if not found:
        return None
    table = corruption_table([r for r, _ in found])
    metrics, several = _metrics(table), _several_modes(table)
    panels: list[tuple[str, dict[str, pd.DataFrame]]] = []  # (title, metric -> grid); the first: the base
    for _, row in table.iterrows():
        if row["method"] == "base":
            per_seed = {r.seed: c for r, c in found}.values()  # one base per seed
            grids = {m: _mean([_grid(c["base"][m]) for c in per_seed]) for m in metrics}
            panels.append((f"{METHOD_LABELS['base']}\nn={row['n']}", grids))  # first: the table's order
            continue
        key = {c: None if pd.isna(row[c]) else row[c] for c in ROW}
        mine = [c for r, c in found if r.method and _row(r) == key]
        deltas = {m: _mean([_grid(c["final"][m]) - _grid(c["base"][m]) for c in mine]) for m in metrics}
        k = "" if key["k"] is None else f"k={key['k']}, "
        panels.append((f"Δ {_label(row, several)}\n{k}n={row['n']}", deltas))
    changes = [np.abs(g.to_numpy()).max() for _, grids in panels[1:] for g in grids.values()]
    limit = max([1.0, *map(float, changes)])
    n_corruptions = len(next(iter(panels[0][1].values())))
    with style():
        fig = Figure(
            figsize=(1.4 + 1.7 * len(panels), len(metrics) * (0.8 + 0.17 * n_corruptions) + 0.4),
            layout="constrained",
        )
        axes = fig.subplots(len(metrics), len(panels), squeeze=False, sharey=True)
        for i, m in enumerate(metrics):
            for j, (name, grids) in enumerate(panels):
                change = j > 0
                sns.heatmap(
                    grids[m],
                    ax=axes[i][j],
                    annot=True,
                    fmt="+.1f" if change else ".1f",
                    annot_kws={"fontsize": 5},
                    cmap="RdBu" if change else "viridis",
                    center=0 if change else None,
                    vmin=-limit if change else None,
                    vmax=limit if change else None,
                    cbar=j in (0, len(panels) - 1),
                    cbar_kws={"label": "Δ acc. (pp)" if change else "acc. (%)", "shrink": 0.6},
                )
                axes[i][j].set_title(name if i == 0 else "")
                axes[i][j].set_xlabel("severity" if i == len(metrics) - 1 else "")
                axes[i][j].set_ylabel(f"{METRIC_LABELS[m]} accuracy" if j == 0 else "")
        if title:
            fig.suptitle(title)
    return fig
