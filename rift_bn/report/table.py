"""Table 1 (RiFT vs RiFT with BN over k, deltas against the base) and the layer-type table.

Numbers are test-split accuracies in percent from ``results.json``. Runs are pooled over seeds only within
one experiment (:func:`rift_bn.report.collect.experiments`), one run per seed, giving mean, sample std
(``ddof=1``) and ``n`` = the number of distinct seeds. With ``n == 1`` the std is left empty (NaN in the
CSV, omitted in Markdown). Deltas are taken per run (fine-tuned minus that run's own base), then averaged.
A row is (method, BN-statistics mode ``finetune.bn_stats``, k, MRC estimator): the caption states each
method's mode, and a method run with several modes (an ablation) gets one row per mode, labelled e.g.
``RiFT with BN (BN stats: none)``; the CSV has a ``bn_stats`` column.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from rift_bn.report.collect import (
    BN_STATS_TEXT,
    LAYER_TYPE_METHODS,
    METHOD_LABELS,
    TOPK_METHODS,
    bn_stats,
    bn_stats_label,
    bn_stats_order,
    experiments,
    interpolation_alphas,
    row_estimator,
    setting_label,
)

__all__ = [
    "METRICS",
    "aggregate",
    "bn_stats_caption",
    "final_model_text",
    "fmt",
    "layer_types_table",
    "run_table",
    "table1",
    "to_markdown",
    "write_tables",
]

METRICS: tuple[str, ...] = ("clean_acc", "robust_acc", "delta_clean", "delta_robust")
KEYS: list[str] = ["experiment", "dataset", "model", "width", "method", "bn_stats", "k", "estimator"]


def run_table(runs: list[dict], log: Callable[[str], None] | None = None) -> pd.DataFrame:
    """One row per fine-tuned run, plus one ``method="base"`` row per (experiment, seed).

    ``experiment`` is the experiment's tag and ``label`` what sets it apart. When runs of one experiment and
    seed report different base accuracies (different base checkpoints), the first is kept and ``log`` says so.
    """
    rows: list[dict] = []
    bases: dict[tuple, dict] = {}
    for e in experiments(runs):
        dataset, model, width = e.setting
        for r in e.runs:
            common = {
                "experiment": e.tag,
                "label": e.label,
                "dataset": dataset,
                "model": model,
                "width": width,
                "seed": r.get("seed"),
            }
            base = (r["base"]["clean_acc"], r["base"]["robust_acc"])
            old = bases.get((e.tag, r.get("seed")))
            if old is None:
                bases[(e.tag, r.get("seed"))] = {
                    **common,
                    "method": "base",
                    "bn_stats": "",
                    "k": np.nan,
                    "estimator": "",
                    "clean_acc": base[0],
                    "robust_acc": base[1],
                    "delta_clean": np.nan,
                    "delta_robust": np.nan,
                    "alpha": np.nan,
                    "selected": "",
                    "path": r["_path"],
                }
            elif log is not None and (old["clean_acc"], old["robust_acc"]) != base:
                log(
                    f"note: {e.tag} seed {r.get('seed')}: base accuracy differs between {old['path']} and "
                    f"{r['_path']} (different base checkpoints); the base row uses the first"
                )
            if r.get("stage") != "finetune" or not r.get("method"):
                continue
            rows.append(
                {
                    **common,
                    "method": r["method"],
                    "bn_stats": bn_stats(r),
                    "k": float(r["k"]) if r.get("k") is not None else np.nan,
                    "estimator": row_estimator(r),
                    "clean_acc": r["final"]["clean_acc"],
                    "robust_acc": r["final"]["robust_acc"],
                    "delta_clean": r["final"]["clean_acc"] - r["base"]["clean_acc"],
                    "delta_robust": r["final"]["robust_acc"] - r["base"]["robust_acc"],
                    "alpha": r["alpha"] if r.get("alpha") is not None else np.nan,
                    "selected": " ".join(s["name"] for s in r.get("selected") or []),
                    "path": r["_path"],
                }
            )
    cols = [*KEYS, "label", "seed", *METRICS, "alpha", "selected", "path"]
    return pd.DataFrame(list(bases.values()) + rows, columns=cols)


def aggregate(per_run: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std (ddof=1; NaN for n=1) and n of every metric per (experiment, method, bn_stats, k,
    estimator).

    Raises ``ValueError`` when a seed occurs twice in one cell: ``n`` counts distinct seeds, and duplicate
    jobs are dropped by :func:`rift_bn.report.collect.load`.
    """
    out: list[dict] = []
    if per_run.empty:
        return pd.DataFrame(
            columns=[*KEYS, "label", *(f"{m}_{s}" for m in METRICS for s in ("mean", "std")), "n", "seeds"]
        )
    keyed = per_run.assign(_k=per_run["k"].fillna(-1))
    for _, g in keyed.groupby(["experiment", "method", "bn_stats", "_k", "estimator"], sort=False):
        first = g.iloc[0]
        seeds = [int(s) for s in g["seed"] if s is not None and not pd.isna(s)]
        if len(set(seeds)) < len(g):
            what = f"{first['experiment']} {first['method']}"
            what += f" bn_stats={first['bn_stats']}" if first["bn_stats"] else ""
            raise ValueError(
                f"{what} k={first['k']}: {len(g)} runs for seeds {seeds} "
                f"({', '.join(g['path'])}); one run per seed is pooled (load them with "
                "rift_bn.report.collect.load, which keeps the newest of duplicate jobs)"
            )
        row = {key: first[key] for key in [*KEYS, "label"]}
        for m in METRICS:
            vals = g[m].to_numpy(dtype=float)
            row[f"{m}_mean"] = float(np.mean(vals)) if not np.isnan(vals).all() else np.nan
            row[f"{m}_std"] = (
                float(np.std(vals, ddof=1)) if len(vals) > 1 and not np.isnan(vals).any() else np.nan
            )
        row["alpha_mean"] = float(g["alpha"].mean()) if g["alpha"].notna().any() else np.nan
        row["n"] = len(set(seeds))
        row["seeds"] = " ".join(str(s) for s in sorted(seeds))
        out.append(row)
    df = pd.DataFrame(out)
    df["k"] = df["k"].astype("Int64")
    return df


def _order(df: pd.DataFrame, methods: tuple[str, ...]) -> pd.DataFrame:
    rank = {m: i for i, m in enumerate(("base", *methods))}
    exp_rank = {tag: i for i, tag in enumerate(dict.fromkeys(df["experiment"]))}
    df = df.assign(
        _m=df["method"].map(rank),
        _b=[bn_stats_order(m, b) for m, b in zip(df["method"], df["bn_stats"], strict=True)],
        _kk=df["k"].fillna(0).astype(int),
        _w=df["width"].astype(str),
        _e=df["experiment"].map(exp_rank),
    )
    return df.sort_values(["dataset", "model", "_w", "_e", "_kk", "_m", "_b", "estimator"]).drop(
        columns=["_m", "_b", "_kk", "_w", "_e"]
    )


def _with_bases(per_run: pd.DataFrame, methods: tuple[str, ...], base_only: bool) -> pd.DataFrame:
    """The runs of ``methods`` plus the bases of their (experiment, seed); with ``base_only``, also every
    base of an experiment that has no fine-tuned run at all (a base-model-only sweep)."""
    chosen = per_run[per_run["method"].isin(methods)]
    used = set(zip(chosen["experiment"], chosen["seed"], strict=True))
    tuned = set(per_run.loc[per_run["method"] != "base", "experiment"])
    bases = per_run[per_run["method"] == "base"]
    keep = [
        (e, s) in used or (base_only and e not in tuned)
        for e, s in zip(bases["experiment"], bases["seed"], strict=True)
    ]
    return pd.concat([bases[keep], chosen])


def table1(runs: list[dict], log: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Base rows and every (method in rift/rift_bn, k, estimator) cell, per experiment, in the paper's order.

    The base row of an experiment averages the base models of the seeds its RiFT runs used.
    """
    per_run = _with_bases(run_table(runs, log), TOPK_METHODS, base_only=True)
    return _order(aggregate(per_run), TOPK_METHODS).reset_index(drop=True)


def layer_types_table(runs: list[dict], log: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Base rows and the layer-type runs (full, bn_only, conv_linear_only); empty if there are none."""
    per_run = run_table(runs, log)
    if not per_run["method"].isin(LAYER_TYPE_METHODS).any():
        return aggregate(per_run.iloc[:0])
    per_run = _with_bases(per_run, LAYER_TYPE_METHODS, base_only=False)
    return _order(aggregate(per_run), LAYER_TYPE_METHODS).reset_index(drop=True)


def final_model_text(runs: Sequence[dict]) -> str:
    """Which model the numbers of these fine-tuned runs are, from their ``interpolation.alphas``."""
    grids = {tuple(interpolation_alphas(r)) for r in runs if r.get("stage") == "finetune" and r.get("method")}
    if not grids:
        return ""
    if len(grids) > 1:
        return "final model after interpolation (the runs use different interpolation.alphas)"
    (grid,) = grids
    if len(grid) == 1:
        if grid[0] == 1.0:
            return "the fine-tuned model itself (interpolation.alphas = [1.0]: no interpolation)"
        return f"the model interpolated at alpha = {grid[0]:g} (interpolation.alphas = [{grid[0]:g}])"
    return (
        "final model after interpolation (alpha* chosen on the selection split from "
        f"[{', '.join(f'{a:g}' for a in grid)}])"
    )


def fmt(mean: float, std: float, signed: bool = False) -> str:
    """``81.45 ± 0.12`` (std omitted when NaN), ``+1.69`` for deltas, ``–`` when there is no value."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += f" ± {std:.2f}"
    return text


def bn_stats_caption(runs: Sequence[dict], methods: Sequence[str] = TOPK_METHODS) -> str:
    """What each of ``methods`` did with the BN running statistics in ``runs`` (fine-tuned runs), e.g.

    ``BN statistics while fine-tuning: RiFT: every BN layer's running statistics adapt (finetune.bn_stats=all,
    as the original RiFT code); RiFT with BN: only the selected BN layers' ... (finetune.bn_stats=selected).``
    A method run with several modes lists them all (one row each). ``""`` when no run is of ``methods``.
    """
    modes: dict[str, set[str]] = {}
    bn_selected: dict[str, str] = {}  # which BN layers the method selects: "none", "every" or "some"
    for r in runs:
        if r.get("stage") == "finetune" and r.get("method") in methods:
            m = str(r["method"])
            modes.setdefault(m, set()).add(bn_stats(r))
            method_cfg = (r.get("config") or {}).get("method") or {}
            kinds = method_cfg.get("kinds")
            has_bn = "bn" in kinds if kinds is not None else m not in ("rift", "conv_linear_only")
            every = method_cfg.get("selection", "all" if m in LAYER_TYPE_METHODS else "mrc") == "all"
            bn_selected[m] = "none" if not has_bn else ("every" if every else "some")

    def text(m: str, b: str) -> str:
        out = BN_STATS_TEXT.get(b, f"finetune.bn_stats={b}")
        if b == "selected" and bn_selected.get(m) == "none":
            out = out[:-1] + "; it selects no BN layer, so none adapt)"
        elif b == "selected" and bn_selected.get(m) == "every":
            out = out[:-1] + "; it selects every BN layer, so all adapt)"
        return out

    parts = []
    for m in [m for m in methods if m in modes]:
        texts = [text(m, b) for b in sorted(modes[m], key=lambda b: bn_stats_order(m, b))]
        label = METHOD_LABELS.get(m, m)
        several = f"{label}, one row per mode: {' or '.join(texts)}"
        parts.append(f"{label}: {texts[0]}" if len(texts) == 1 else several)
    return f"BN statistics while fine-tuning: {'; '.join(parts)}." if parts else ""


def _label(row: pd.Series, several_modes: frozenset[str] = frozenset()) -> str:
    label = METHOD_LABELS.get(row["method"], row["method"])
    if row["method"] in several_modes:
        label += bn_stats_label(row["bn_stats"])
    if row["estimator"] not in ("", "exact"):
        label += f" ({row['estimator']} MRC)"
    return label


def _attack_text(runs: Sequence[dict]) -> str:
    attack = next(
        ((r.get("config") or {}).get("attack") for r in runs if (r.get("config") or {}).get("attack")), None
    )
    if not attack:
        return "PGD"
    return f"PGD-{attack.get('steps', '?')} (eps {attack.get('eps', '?')}, step {attack.get('alpha', '?')})"


def _heading(first: pd.Series) -> str:
    text = setting_label((first["dataset"], first["model"], first["width"]))
    if first.get("label"):
        text += f" · {first['label']} (`{first['experiment']}`)"
    return text


def _markdown_block(
    df: pd.DataFrame, topk: bool, extra: Callable[[str], list[str]] = lambda _: []
) -> list[str]:
    lines: list[str] = []
    header = (
        "| Top k | Method | Clean acc. (%) | Robust acc. (%) | n |"
        if topk
        else "| Method | Clean acc. (%) | Robust acc. (%) | n |"
    )
    rule = "|---|---|---:|---:|---:|" if topk else "|---|---:|---:|---:|"
    for tag, g in df.groupby("experiment", sort=False):
        lines += ["", f"### {_heading(g.iloc[0])}", "", *extra(str(tag)), header, rule]
        tuned = g[g["method"] != "base"]
        several = frozenset(m for m, modes in tuned.groupby("method")["bn_stats"] if modes.nunique() > 1)
        last_k = None
        for _, row in g.iterrows():
            label = _label(row, several)
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


def _notes(runs: Sequence[dict], notes: Sequence[str]) -> list[str]:
    exps = experiments(runs)
    lines = ["", "## Notes", ""]
    if len(exps) > 1:
        lines.append(
            f"- {len(exps)} experiments; runs are pooled over seeds only within one (same config up to the "
            "seed, method, k, finetune.bn_stats and MRC estimator):"
        )
    for e in exps:
        shown = e.folders[:3] + ([f"+{len(e.folders) - 3} more"] if len(e.folders) > 3 else [])
        lines.append(
            f"{'  ' if len(exps) > 1 else ''}- `{e.tag}`{f' ({e.label})' if e.label else ''}: "
            f"{len(e.runs)} run(s), seeds {', '.join(map(str, e.seeds)) or '–'}; from {', '.join(shown)}"
        )
    return lines + [f"- {n}" for n in notes]


def to_markdown(
    table: pd.DataFrame,
    layer_table: pd.DataFrame | None = None,
    runs: Sequence[dict] | None = None,
    notes: Sequence[str] = (),
) -> str:
    """Table 1 and the layer-type table (when it has rows) as Markdown, one section per experiment.

    With ``runs``, a Notes section lists the experiments (tag, what differs, seeds, folders) and ``notes``.
    """
    runs = list(runs or [])
    by_tag = {e.tag: e.runs for e in experiments(runs)}
    attacks = {_attack_text(rs) for rs in by_tag.values()}
    common = len(attacks) <= 1
    attack_line = lambda tag: [] if common else [f"Robust = {_attack_text(by_tag.get(tag, []))}.", ""]

    def bn_lines(methods: Sequence[str], tags: Sequence[str]) -> tuple[str, Callable[[str], list[str]]]:
        """The BN-statistics caption for all of ``tags`` when they agree (else ``""``), and per section."""
        texts = {tag: bn_stats_caption(by_tag.get(tag, []), methods) for tag in tags}
        shared = set(texts.values())
        if len(shared) <= 1:
            return next(iter(shared), ""), lambda _: []
        return "", lambda tag: [texts[tag], ""] if texts.get(tag) else []

    t1_tags = list(dict.fromkeys(table["experiment"])) if not table.empty else []
    t1_bn, t1_bn_line = bn_lines(TOPK_METHODS, t1_tags)
    lines = [
        "## Table 1: RiFT vs RiFT with BN over Top-k",
        "",
        f"Test-split accuracy (%). {f'Robust = {_attack_text(runs)}. ' if common else ''}"
        "Δ = fine-tuned minus base, per seed; mean ± sample std (ddof=1) over n distinct seeds "
        "(std omitted when n = 1)." + (f" {t1_bn}" if t1_bn else ""),
    ]
    if not table.empty:
        lines += _markdown_block(table, topk=True, extra=lambda tag: attack_line(tag) + t1_bn_line(tag))
    if table.empty or not table["method"].isin(TOPK_METHODS).any():
        lines += ["", "(no rift / rift_bn runs found)"]
    if layer_table is not None and not layer_table.empty:
        lt = lambda rs: [r for r in rs if r.get("method") in LAYER_TYPE_METHODS]
        texts = {
            tag: final_model_text(lt(by_tag.get(tag, []))) for tag in dict.fromkeys(layer_table["experiment"])
        }
        one = set(texts.values()) if len(set(texts.values())) == 1 else set()
        heading = "## Fine-tuning by layer type (Figures 1-2)"
        lines += ["", heading + (f": {next(iter(one))}" if one and next(iter(one)) else "")]
        lt_bn, lt_bn_line = bn_lines(LAYER_TYPE_METHODS, list(texts))
        lines += ["", lt_bn] if lt_bn else []

        def extra(tag: str) -> list[str]:
            final = [] if one or not texts.get(tag) else [f"Final model: {texts[tag]}.", ""]
            return attack_line(tag) + final + lt_bn_line(tag)

        lines += _markdown_block(layer_table, topk=False, extra=extra)
    if runs:
        lines += _notes(runs, notes)
    return "\n".join(lines) + "\n"


def _csv_frame(df: pd.DataFrame) -> pd.DataFrame:
    cols = [
        *KEYS,
        "label",
        *(f"{m}_{s}" for m in METRICS for s in ("mean", "std")),
        "alpha_mean",
        "n",
        "seeds",
    ]
    return df[[c for c in cols if c in df.columns]]


def write_tables(
    runs: list[dict], out: Path, log: Callable[[str], None] | None = None, notes: Sequence[str] = ()
) -> tuple[pd.DataFrame, pd.DataFrame, list[Path]]:
    """Write ``table1.md`` (with ``notes``), ``table1.csv``, ``layer_types.csv`` (if any) and ``runs.csv``."""
    out.mkdir(parents=True, exist_ok=True)
    t1, lt = table1(runs, log), layer_types_table(runs)
    files = [out / "table1.md", out / "table1.csv", out / "runs.csv"]
    files[0].write_text(to_markdown(t1, lt, runs, notes))
    _csv_frame(t1).to_csv(files[1], index=False)
    run_table(runs).to_csv(files[2], index=False)
    if not lt.empty:
        files.append(out / "layer_types.csv")
        _csv_frame(lt).to_csv(files[-1], index=False)
    return t1, lt, files
