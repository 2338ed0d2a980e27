"""Table 1 (RiFT vs RiFT with BN over k, deltas against the base) and the layer-type table.

Numbers are test-split accuracies in percent from ``results.json``; several seeds give mean, sample std
(``ddof=1``) and ``n``. With ``n == 1`` the std is left empty (NaN in the CSV, omitted in Markdown).
Deltas are taken per run (fine-tuned minus that run's own base) and then averaged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from rift_bn.report.collect import (
    LAYER_TYPE_METHODS,
    METHOD_LABELS,
    TOPK_METHODS,
    estimator,
    setting,
    setting_label,
)

__all__ = [
    "METRICS",
    "aggregate",
    "fmt",
    "layer_types_table",
    "run_table",
    "table1",
    "to_markdown",
    "write_tables",
]

METRICS: tuple[str, ...] = ("clean_acc", "robust_acc", "delta_clean", "delta_robust")
KEYS: list[str] = ["dataset", "model", "width", "method", "k", "estimator"]


def run_table(runs: list[dict]) -> pd.DataFrame:
    """One row per run (fine-tuned runs, plus one ``method="base"`` row per distinct base model and seed)."""
    rows: list[dict] = []
    bases: dict[tuple, dict] = {}
    for r in runs:
        dataset, model, width = setting(r)
        common = {"dataset": dataset, "model": model, "width": width, "seed": r.get("seed")}
        base_key = (dataset, model, width, r.get("seed"), r["base"].get("checkpoint"))
        bases.setdefault(
            base_key,
            {
                **common,
                "method": "base",
                "k": np.nan,
                "estimator": "",
                "clean_acc": r["base"]["clean_acc"],
                "robust_acc": r["base"]["robust_acc"],
                "delta_clean": np.nan,
                "delta_robust": np.nan,
                "alpha": np.nan,
                "selected": "",
                "path": r["_path"],
            },
        )
        if r.get("stage") != "finetune" or not r.get("method"):
            continue
        rows.append(
            {
                **common,
                "method": r["method"],
                "k": float(r["k"]) if r.get("k") is not None else np.nan,
                "estimator": estimator(r) if r["method"] in TOPK_METHODS else "",
                "clean_acc": r["final"]["clean_acc"],
                "robust_acc": r["final"]["robust_acc"],
                "delta_clean": r["final"]["clean_acc"] - r["base"]["clean_acc"],
                "delta_robust": r["final"]["robust_acc"] - r["base"]["robust_acc"],
                "alpha": r["alpha"] if r.get("alpha") is not None else np.nan,
                "selected": " ".join(s["name"] for s in r.get("selected") or []),
                "path": r["_path"],
            }
        )
    cols = [*KEYS, "seed", *METRICS, "alpha", "selected", "path"]
    return pd.DataFrame(list(bases.values()) + rows, columns=cols)


def aggregate(per_run: pd.DataFrame, log: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Mean, sample std (ddof=1; NaN for n=1) and n of every metric per (dataset, model, width, method, k)."""
    out: list[dict] = []
    if per_run.empty:
        return pd.DataFrame(
            columns=[*KEYS, *(f"{m}_{s}" for m in METRICS for s in ("mean", "std")), "n", "seeds"]
        )
    keyed = per_run.assign(_k=per_run["k"].fillna(-1), _w=per_run["width"].astype(str))
    for _, g in keyed.groupby(["dataset", "model", "_w", "method", "_k", "estimator"], sort=False):
        first = g.iloc[0]
        row = {key: first[key] for key in KEYS}
        for m in METRICS:
            vals = g[m].to_numpy(dtype=float)
            row[f"{m}_mean"] = float(np.mean(vals)) if not np.isnan(vals).all() else np.nan
            row[f"{m}_std"] = (
                float(np.std(vals, ddof=1)) if len(vals) > 1 and not np.isnan(vals).any() else np.nan
            )
        row["alpha_mean"] = float(g["alpha"].mean()) if g["alpha"].notna().any() else np.nan
        row["n"] = len(g)
        seeds = [int(s) for s in g["seed"] if s is not None and not pd.isna(s)]
        row["seeds"] = " ".join(str(s) for s in sorted(seeds))
        if log is not None and len(set(seeds)) < len(seeds):
            log(
                f"note: {first['dataset']} {first['method']} k={first['k']}: a seed occurs twice "
                "(runs with different configs); both are counted"
            )
        out.append(row)
    df = pd.DataFrame(out)
    df["k"] = df["k"].astype("Int64")
    return df


def _order(df: pd.DataFrame, methods: tuple[str, ...]) -> pd.DataFrame:
    rank = {m: i for i, m in enumerate(("base", *methods))}
    df = df.assign(_m=df["method"].map(rank), _kk=df["k"].fillna(0).astype(int), _w=df["width"].astype(str))
    return df.sort_values(["dataset", "model", "_w", "_kk", "_m", "estimator"]).drop(
        columns=["_m", "_kk", "_w"]
    )


def _with_bases(per_run: pd.DataFrame, methods: tuple[str, ...], all_settings: bool = True) -> pd.DataFrame:
    """The runs of ``methods`` plus the bases of their (setting, seed); with ``all_settings``, every base of a
    setting without such runs too."""
    key = lambda df: list(zip(df["dataset"], df["model"], df["width"].astype(str), df["seed"], strict=True))
    chosen = per_run[per_run["method"].isin(methods)]
    used_seeds = set(key(chosen))
    used_settings = {t[:3] for t in used_seeds}
    bases = per_run[per_run["method"] == "base"]
    keep = [(t in used_seeds) or (all_settings and t[:3] not in used_settings) for t in key(bases)]
    return pd.concat([bases[keep], chosen])


def table1(runs: list[dict], log: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Base rows and every (method in rift/rift_bn, k) cell, in the paper's order (per dataset, per k).

    The base row of a setting averages the base models of the seeds its RiFT runs used.
    """
    per_run = _with_bases(run_table(runs), TOPK_METHODS)
    return _order(aggregate(per_run, log), TOPK_METHODS).reset_index(drop=True)


def layer_types_table(runs: list[dict], log: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Base rows and the layer-type runs (full, bn_only, conv_linear_only); empty if there are none."""
    per_run = run_table(runs)
    if not per_run["method"].isin(LAYER_TYPE_METHODS).any():
        return aggregate(per_run.iloc[:0])
    per_run = _with_bases(per_run, LAYER_TYPE_METHODS, all_settings=False)
    return _order(aggregate(per_run, log), LAYER_TYPE_METHODS).reset_index(drop=True)


def fmt(mean: float, std: float, signed: bool = False) -> str:
    """``81.45 ± 0.12`` (std omitted when NaN), ``+1.69`` for deltas, ``–`` when there is no value."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += f" ± {std:.2f}"
    return text


def _label(row: pd.Series) -> str:
    label = METHOD_LABELS.get(row["method"], row["method"])
    if row["estimator"] not in ("", "exact"):
        label += f" ({row['estimator']} MRC)"
    return label


def _attack_text(runs: list[dict]) -> str:
    attack = next(
        ((r.get("config") or {}).get("attack") for r in runs if (r.get("config") or {}).get("attack")), None
    )
    if not attack:
        return "PGD"
    return f"PGD-{attack.get('steps', '?')} (eps {attack.get('eps', '?')}, step {attack.get('alpha', '?')})"


def _markdown_block(df: pd.DataFrame, topk: bool) -> list[str]:
    lines: list[str] = []
    header = (
        "| Top k | Method | Clean acc. (%) | Robust acc. (%) | n |"
        if topk
        else "| Method | Clean acc. (%) | Robust acc. (%) | n |"
    )
    rule = "|---|---|---:|---:|---:|" if topk else "|---|---:|---:|---:|"
    for s, g in df.groupby(["dataset", "model", df["width"].astype(str)], sort=False):
        width = g.iloc[0]["width"]
        lines += ["", f"### {setting_label((s[0], s[1], width))}", "", header, rule]
        last_k = None
        for _, row in g.iterrows():
            label = _label(row)
            clean = fmt(row["clean_acc_mean"], row["clean_acc_std"])
            robust = fmt(row["robust_acc_mean"], row["robust_acc_std"])
            cells = [label, clean, robust, str(row["n"])]
            if topk:
                k = "" if pd.isna(row["k"]) or row["k"] == last_k else f"Top {row['k']}"
                last_k = row["k"] if not pd.isna(row["k"]) else last_k
                cells = [k, *cells]
            lines.append("| " + " | ".join(cells) + " |")
            if row["method"] != "base":
                d_clean = fmt(row["delta_clean_mean"], row["delta_clean_std"], signed=True)
                d_robust = fmt(row["delta_robust_mean"], row["delta_robust_std"], signed=True)
                cells = [f"Δ {label}", d_clean, d_robust, ""]
                lines.append("| " + " | ".join(([""] if topk else []) + cells) + " |")
    return lines


def to_markdown(
    table: pd.DataFrame, layer_table: pd.DataFrame | None = None, runs: list[dict] | None = None
) -> str:
    """Table 1 (and the layer-type table when it has rows) as Markdown, grouped per dataset/model."""
    attack = _attack_text(runs or [])
    lines = [
        "## Table 1: RiFT vs RiFT with BN over Top-k",
        "",
        f"Test-split accuracy (%). Robust = {attack}. Δ = fine-tuned minus base, per seed; "
        "mean ± sample std (ddof=1) over n seeds (std omitted when n = 1).",
    ]
    if not table.empty:
        lines += _markdown_block(table, topk=True)
    if table.empty or not table["method"].isin(TOPK_METHODS).any():
        lines += ["", "(no rift / rift_bn runs found)"]
    if layer_table is not None and not layer_table.empty:
        lines += ["", "## Fine-tuning by layer type (Figures 1-2, final model after interpolation)"]
        lines += _markdown_block(layer_table, topk=False)
    return "\n".join(lines) + "\n"


def _csv_frame(df: pd.DataFrame) -> pd.DataFrame:
    cols = [*KEYS, *(f"{m}_{s}" for m in METRICS for s in ("mean", "std")), "alpha_mean", "n", "seeds"]
    return df[[c for c in cols if c in df.columns]]


def write_tables(
    runs: list[dict], out: Path, log: Callable[[str], None] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, list[Path]]:
    """Write ``table1.md``, ``table1.csv``, ``layer_types.csv`` (if any) and ``runs.csv`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    t1, lt = table1(runs, log), layer_types_table(runs, log)
    files = [out / "table1.md", out / "table1.csv", out / "runs.csv"]
    files[0].write_text(to_markdown(t1, lt, runs))
    _csv_frame(t1).to_csv(files[1], index=False)
    run_table(runs).to_csv(files[2], index=False)
    if not lt.empty:
        files.append(out / "layer_types.csv")
        _csv_frame(lt).to_csv(files[-1], index=False)
    return t1, lt, files
