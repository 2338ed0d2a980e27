"""Table 1 (RiFT vs RiFT with BN over k, deltas against the base), the layer-type table, and the paired
comparison of RiFT with BN against RiFT.

Numbers are test-split accuracies in percent from ``results.json``. Runs are pooled over seeds only within
one experiment (:func:`rift_bn.report.collect.experiments`), one run per seed, giving mean, sample std
(``ddof=1``) and ``n`` = the number of distinct seeds. With ``n == 1`` the std is left empty (NaN in the
CSV, omitted in Markdown). Deltas are taken per run (fine-tuned minus that run's own base), then averaged.
A row is (method, BN-statistics mode ``finetune.bn_stats``, k, MRC estimator): the caption states each
method's mode, and a method run with several modes (an ablation) gets one row per mode, labelled e.g.
``RiFT with BN (BN stats: none)``; the CSV has a ``bn_stats`` column.

Paired statistics (:mod:`rift_bn.stats`), from the runs' per-image outcomes (``outcomes.npz``): per row, the
delta final minus base pooled over seeds (the test images of every seed, each pair within its seed), its
95% bootstrap interval and the exact McNemar p-value; per (k, seed), the final models of RiFT with BN and
RiFT on the same test images (:func:`rift_vs_rift_bn`). A row with a run that has no outcomes (written
before them) shows ``n/a`` there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rift_bn.report.collect import (
    BN_STATS_TEXT,
    LAYER_TYPE_METHODS,
    METHOD_LABELS,
    TOPK_METHODS,
    Run,
    attack_text,
    bn_stats_label,
    bn_stats_order,
    experiments,
    setting_label,
)
from rift_bn.stats import ALPHA, TESTS_NOTE, paired_stats, pooled

__all__ = [
    "METRICS",
    "PAIRED",
    "aggregate",
    "bn_stats_caption",
    "final_model_text",
    "fmt",
    "fmt_paired",
    "layer_types_table",
    "pooled_stats",
    "rift_vs_rift_bn",
    "run_table",
    "table1",
    "to_markdown",
    "write_tables",
]

METRICS: tuple[str, ...] = ("clean_acc", "robust_acc", "delta_clean", "delta_robust")
KEYS: list[str] = ["experiment", "dataset", "model", "width", "method", "bn_stats", "k", "estimator"]
# paired statistics per accuracy (rift_bn.stats.paired_stats), columns paired_<metric>_<field>
PAIRED: tuple[str, ...] = ("clean", "robust")
PAIRED_FIELDS: tuple[str, ...] = ("delta", "ci_low", "ci_high", "p_value")
PAIRED_COLUMNS: list[str] = [f"paired_{m}_{f}" for m in PAIRED for f in PAIRED_FIELDS] + ["paired_images"]
NA = "n/a"


def _test_images(r: Run) -> float:
    """Test images the run was scored on (its outcomes, else its record's ``test_size``; NaN if neither)."""
    if r.outcomes is not None:
        return float(len(r.test_index))
    return float(r.results.test_size) if r.results.test_size is not None else np.nan


def _run_stats(r: Run) -> dict[str, float]:
    """The run's own paired statistics as the job wrote them (``results.stats``), NaN without them."""
    stats = r.results.stats or {}
    return {
        f"paired_{m}_{f}": float(stats[m][f]) if m in stats else np.nan for m in PAIRED for f in PAIRED_FIELDS
    }


def run_table(runs: Sequence[Run], log: Callable[[str], None] | None = None) -> pd.DataFrame:
    """One row per fine-tuned run, plus one ``method="base"`` row per (experiment, seed).

    ``experiment`` is the experiment's tag and ``label`` what sets it apart; a fine-tuned row has the run's
    own paired statistics (``results.stats``) and ``_run``, the run itself (not written to files). When runs
    of one experiment and seed report different base accuracies (different base checkpoints), the first is
    kept and ``log`` says so.
    """
    rows: list[dict[str, Any]] = []
    bases: dict[tuple[str, int], dict[str, Any]] = {}
    for e in experiments(runs):
        dataset, model, width = e.setting
        for r in e.runs:
            common = {
                "experiment": e.tag,
                "label": e.label,
                "dataset": dataset,
                "model": model,
                "width": width,
                "seed": r.seed,
                "test_images": _test_images(r),
            }
            base = (r.results.base["clean_acc"], r.results.base["robust_acc"])
            old = bases.get((e.tag, r.seed))
            if old is None:
                bases[(e.tag, r.seed)] = {
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
                    "path": str(r.path),
                    "_run": None,
                }
            elif log is not None and (old["clean_acc"], old["robust_acc"]) != base:
                log(
                    f"note: {e.tag} seed {r.seed}: base accuracy differs between {old['path']} and "
                    f"{r.path} (different base checkpoints); the base row uses the first"
                )
            if not r.method:
                continue
            final = r.results.final
            rows.append(
                {
                    **common,
                    "method": r.method,
                    "bn_stats": r.bn_stats,
                    "k": float(r.k) if r.k is not None else np.nan,
                    "estimator": r.row_estimator,
                    "clean_acc": final["clean_acc"],
                    "robust_acc": final["robust_acc"],
                    "delta_clean": final["clean_acc"] - base[0],
                    "delta_robust": final["robust_acc"] - base[1],
                    "alpha": r.results.alpha if r.results.alpha is not None else np.nan,
                    "selected": " ".join(s["name"] for s in r.results.selected),
                    "path": str(r.path),
                    **_run_stats(r),
                    "_run": r,
                }
            )
    cols = [*KEYS, "label", "seed", *METRICS, "alpha", "test_images", "selected", "path"]
    cols += [c for c in PAIRED_COLUMNS if c != "paired_images"] + ["_run"]
    return pd.DataFrame(list(bases.values()) + rows, columns=cols)


def _paired_columns(before: Sequence[tuple[Run, str]], after: Sequence[tuple[Run, str]]) -> dict[str, float]:
    """``paired_<metric>_<field>`` and ``paired_images``: :func:`rift_bn.stats.paired_stats` of the outcomes
    of ``after`` vs ``before`` (``(run, "base" | "final")`` pairs, run by run), pooled over the runs."""
    out: dict[str, float] = {}
    for m in PAIRED:
        s = paired_stats(
            pooled([r.correct(who, m) for r, who in before]), pooled([r.correct(who, m) for r, who in after])
        )
        out |= {f"paired_{m}_{f}": float(s[f]) for f in PAIRED_FIELDS} | {"paired_images": float(s["n"])}
    return out


def pooled_stats(runs: Sequence[Run]) -> dict[str, float]:
    """The paired statistics (:func:`_paired_columns`) of final vs base over the test images of every run
    (images x seeds), each run's pairs kept together; NaN when a run has no outcomes."""
    if not runs or any(r.outcomes is None for r in runs):
        return dict.fromkeys(PAIRED_COLUMNS, np.nan)
    return _paired_columns([(r, "base") for r in runs], [(r, "final") for r in runs])


def _alphas(values: Sequence[float]) -> str:
    """alpha* of a row's seeds, in seed order: one value when they agree (``0.5``), else ``0/0.5/1``."""
    shown = [f"{a:g}" for a in values if not math.isnan(a)]
    return shown[0] if len(set(shown)) == 1 else "/".join(shown)


def aggregate(per_run: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std (ddof=1; NaN for n=1) and n of every metric per (experiment, method, bn_stats, k,
    estimator); alpha* (mean, and per seed), test images per seed (NaN when the seeds differ) and the
    pooled paired statistics of the fine-tuned rows (:func:`pooled_stats`).

    Raises ``ValueError`` when a seed occurs twice in one cell: ``n`` counts distinct seeds, and duplicate
    jobs are dropped by :func:`rift_bn.report.collect.load`.
    """
    stats_cols = [f"{m}_{s}" for m in METRICS for s in ("mean", "std")]
    cols = [*KEYS, "label", *stats_cols, "alpha_mean", "alphas", "n", "seeds", "test_images", *PAIRED_COLUMNS]
    if per_run.empty:
        return pd.DataFrame(columns=cols)
    out: list[dict[str, Any]] = []
    keyed = per_run.assign(_k=per_run["k"].fillna(-1))
    for _, cell in keyed.groupby(["experiment", "method", "bn_stats", "_k", "estimator"], sort=False):
        g = cell.sort_values("seed", kind="stable")
        first = g.iloc[0]
        seeds = [int(s) for s in g["seed"]]
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
        row["alphas"] = _alphas(g["alpha"].tolist())
        row["n"] = len(set(seeds))
        row["seeds"] = " ".join(str(s) for s in sorted(seeds))
        images = set(g["test_images"])
        row["test_images"] = images.pop() if len(images) == 1 else np.nan
        tuned = first["method"] != "base"
        row |= pooled_stats(list(g["_run"])) if tuned else dict.fromkeys(PAIRED_COLUMNS, np.nan)
        out.append(row)
    df = pd.DataFrame(out, columns=cols)
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


def table1(runs: Sequence[Run], log: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Base rows and every (method in rift/rift_bn, k, estimator) cell, per experiment, in the paper's order.

    The base row of an experiment averages the base models of the seeds its RiFT runs used.
    """
    per_run = _with_bases(run_table(runs, log), TOPK_METHODS, base_only=True)
    return _order(aggregate(per_run), TOPK_METHODS).reset_index(drop=True)


def layer_types_table(runs: Sequence[Run], log: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Base rows and the layer-type runs (full, bn_only, conv_linear_only); empty if there are none."""
    per_run = run_table(runs, log)
    if not per_run["method"].isin(LAYER_TYPE_METHODS).any():
        return aggregate(per_run.iloc[:0])
    per_run = _with_bases(per_run, LAYER_TYPE_METHODS, base_only=False)
    return _order(aggregate(per_run), LAYER_TYPE_METHODS).reset_index(drop=True)


def rift_vs_rift_bn(runs: Sequence[Run]) -> tuple[pd.DataFrame, list[str]]:
    """RiFT with BN against RiFT at the same k (and MRC estimator), paired on the same test images.

    Per (experiment, k, estimator, BN-statistics mode of each method), the seeds with both runs: the two
    final models' outcomes on the same test images (``test_index`` equal), pooled over those seeds: delta =
    RiFT with BN minus RiFT, its 95% CI and McNemar p (``paired_*`` columns), ``n`` seeds. Seeds whose runs
    have no outcomes or were scored on other images are left out; the notes say which and why.
    """
    rows: list[dict[str, Any]] = []
    left_out: dict[tuple[str, str], list[str]] = {}  # (experiment, why): "k=1 seed 0", ...
    for e in experiments(runs):
        cells: dict[tuple[int, str, str, str], dict[int, Run]] = {}  # (k, estimator, method, bn_stats)
        for r in e.runs:
            if r.method in TOPK_METHODS and r.k is not None:
                cells.setdefault((r.k, r.row_estimator, r.method, r.bn_stats), {})[r.seed] = r
        order = lambda c: (c[0], c[1] != "exact", c[1], bn_stats_order(c[2], c[3]))
        for rift in sorted((c for c in cells if c[2] == "rift"), key=order):
            k, est = rift[:2]
            for bn in sorted((c for c in cells if c[2] == "rift_bn" and c[:2] == (k, est)), key=order):
                pairs, skipped = _pairs(cells[rift], cells[bn])
                what = f"k={k}" + (f" ({est} MRC)" if est not in ("", "exact") else "")
                for seed, why in skipped:
                    left_out.setdefault((e.tag, why), []).append(f"{what} seed {seed}")
                if not pairs:
                    continue
                dataset, model, width = e.setting
                rows.append(
                    {
                        "experiment": e.tag,
                        "label": e.label,
                        "dataset": dataset,
                        "model": model,
                        "width": width,
                        "k": k,
                        "estimator": est,
                        "rift_bn_stats": rift[3],
                        "rift_bn_bn_stats": bn[3],
                        "n": len(pairs),
                        "seeds": " ".join(str(a.seed) for a, _ in pairs),
                        "test_images": float(len(pairs[0][0].test_index)),
                        **_paired_columns([(a, "final") for a, _ in pairs], [(b, "final") for _, b in pairs]),
                    }
                )
    cols = ["experiment", "label", "dataset", "model", "width", "k", "estimator", "rift_bn_stats"]
    cols += ["rift_bn_bn_stats", "n", "seeds", "test_images", *PAIRED_COLUMNS]
    notes = [
        f"RiFT with BN vs RiFT, {tag}: left out {', '.join(what)} ({why})"
        for (tag, why), what in left_out.items()
    ]
    return pd.DataFrame(rows, columns=cols), notes


def _pairs(
    rift: Mapping[int, Run], bn: Mapping[int, Run]
) -> tuple[list[tuple[Run, Run]], list[tuple[int, str]]]:
    """The (RiFT, RiFT with BN) runs of each seed both have, scored on the same test images; and the seeds
    left out, with why."""
    pairs: list[tuple[Run, Run]] = []
    skipped: list[tuple[int, str]] = []
    for seed in sorted(set(rift) & set(bn)):
        a, b = rift[seed], bn[seed]
        if a.outcomes is None or b.outcomes is None:
            skipped.append((seed, "a run without per-image outcomes"))
        elif not np.array_equal(a.test_index, b.test_index):
            skipped.append((seed, "the two runs were scored on different test images"))
        else:
            pairs.append((a, b))
    return pairs, skipped


def final_model_text(runs: Sequence[Run]) -> str:
    """Which model the numbers of these fine-tuned runs are, from their ``interpolation.alphas``."""
    grids = {tuple(r.interpolation_alphas) for r in runs if r.method}
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


def _nan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def fmt(mean: float, std: float, signed: bool = False, digits: int = 2) -> str:
    """``81.45 ± 0.12`` (std omitted when NaN), ``+1.69`` for deltas, ``–`` when there is no value."""
    if _nan(mean):
        return "–"
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    if not _nan(std):
        text += f" ± {std:.{digits}f}"
    return text


def fmt_paired(row: Mapping[str, Any], metric: str) -> str:
    """``+1.20 [+0.40, +2.00] p=0.003*``: a paired delta, its 95% CI, the McNemar p-value, ``*`` when
    p < :data:`rift_bn.stats.ALPHA`; ``n/a`` without outcomes."""
    delta = row[f"paired_{metric}_delta"]
    if _nan(delta):
        return NA
    low, high, p = (row[f"paired_{metric}_{f}"] for f in ("ci_low", "ci_high", "p_value"))
    return f"{delta:+.2f} [{low:+.2f}, {high:+.2f}] p={p:.2g}" + ("*" if p < ALPHA else "")


def bn_stats_caption(runs: Sequence[Run], methods: Sequence[str] = TOPK_METHODS) -> str:
    """What each of ``methods`` did with the BN running statistics in ``runs`` (fine-tuned runs), e.g.

    ``BN statistics while fine-tuning: RiFT: every BN layer's running statistics adapt (finetune.bn_stats=all,
    as the original RiFT code); RiFT with BN: only the selected BN layers' ... (finetune.bn_stats=selected).``
    A method run with several modes lists them all (one row each). ``""`` when no run is of ``methods``.
    """
    modes: dict[str, set[str]] = {}
    bn_selected: dict[str, str] = {}  # which BN layers the method selects: "none", "every" or "some"
    for r in runs:
        if r.method in methods:
            m = r.method
            modes.setdefault(m, set()).add(r.bn_stats)
            method_cfg = r.results.config.get("method") or {}
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


def _attack_text(runs: Sequence[Run]) -> str:
    return attack_text(runs[0]) if runs else "PGD"


def _heading(first: pd.Series) -> str:
    text = setting_label((first["dataset"], first["model"], first["width"]))
    if first.get("label"):
        text += f" · {first['label']} (`{first['experiment']}`)"
    return text


def _count(v: Any) -> str:
    return "" if _nan(v) else f"{int(v)}"


def _markdown_block(
    df: pd.DataFrame, topk: bool, extra: Callable[[str], list[str]] = lambda _: []
) -> list[str]:
    lines: list[str] = []
    cols = ["Method", "Clean acc. (%)", "Robust acc. (%)", "Δ clean, paired [95% CI]"]
    cols += ["Δ robust, paired [95% CI]", "α*", "n", "Test images"]
    cols = ["Top k", *cols] if topk else cols
    header = "| " + " | ".join(cols) + " |"
    rule = "|" + "|".join("---" if c in ("Top k", "Method") else "---:" for c in cols) + "|"
    for tag, g in df.groupby("experiment", sort=False):
        lines += ["", f"### {_heading(g.iloc[0])}", "", *extra(str(tag)), header, rule]
        tuned = g[g["method"] != "base"]
        several = frozenset(m for m, modes in tuned.groupby("method")["bn_stats"] if modes.nunique() > 1)
        last_k = None
        for _, row in g.iterrows():
            label = _label(row, several)
            base = row["method"] == "base"
            cells = [
                label,
                fmt(row["clean_acc_mean"], row["clean_acc_std"]),
                fmt(row["robust_acc_mean"], row["robust_acc_std"]),
                "" if base else fmt_paired(row, "clean"),
                "" if base else fmt_paired(row, "robust"),
                "" if base else row["alphas"],
                str(row["n"]),
                _count(row["test_images"]),
            ]
            if topk:
                k = "" if pd.isna(row["k"]) or row["k"] == last_k else f"Top {row['k']}"
                last_k = row["k"] if not pd.isna(row["k"]) else last_k
                cells = [k, *cells]
            lines.append("| " + " | ".join(cells) + " |")
            if not base:
                d_clean = fmt(row["delta_clean_mean"], row["delta_clean_std"], signed=True)
                d_robust = fmt(row["delta_robust_mean"], row["delta_robust_std"], signed=True)
                cells = [f"Δ {label}", d_clean, d_robust, "", "", "", "", ""]
                lines.append("| " + " | ".join(([""] if topk else []) + cells) + " |")
    return lines


def _comparison_block(df: pd.DataFrame) -> list[str]:
    """The Markdown of :func:`rift_vs_rift_bn`, one section per experiment."""
    lines: list[str] = []
    header = "| Top k | Comparison | n | Test images | Δ clean [95% CI] | Δ robust [95% CI] |"
    for _, g in df.groupby("experiment", sort=False):
        lines += ["", f"### {_heading(g.iloc[0])}", "", header, "|---|---|---:|---:|---:|---:|"]
        several = g["rift_bn_stats"].nunique() > 1 or g["rift_bn_bn_stats"].nunique() > 1
        for _, row in g.iterrows():
            modes = [bn_stats_label(row[c]) if several else "" for c in ("rift_bn_bn_stats", "rift_bn_stats")]
            what = f"RiFT with BN{modes[0]} − RiFT{modes[1]}"
            what += f" ({row['estimator']} MRC)" if row["estimator"] not in ("", "exact") else ""
            cells = [f"Top {row['k']}", what, str(row["n"]), _count(row["test_images"])]
            cells += [fmt_paired(row, "clean"), fmt_paired(row, "robust")]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _notes(runs: Sequence[Run], notes: Sequence[str]) -> list[str]:
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


STATS_CAPTION = (
    "Δ, paired: final minus base model on the same test images, pooled over the seeds (images x seeds); "
    f"{TESTS_NOTE}; {NA}: a run without per-image outcomes (written before outcomes.npz). "
    "α*: the interpolation factor chosen on the selection split, per seed when the seeds differ "
    "(α* = 0: the final model is the base model). Test images: per seed."
)


def to_markdown(
    table: pd.DataFrame,
    layer_table: pd.DataFrame | None = None,
    runs: Sequence[Run] | None = None,
    notes: Sequence[str] = (),
    comparison: pd.DataFrame | None = None,
) -> str:
    """Table 1, the paired RiFT-with-BN-vs-RiFT table (``comparison``, :func:`rift_vs_rift_bn`) and the
    layer-type table, each when it has rows, as Markdown, one section per experiment.

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
        "",
        STATS_CAPTION,
    ]
    if not table.empty:
        lines += _markdown_block(table, topk=True, extra=lambda tag: attack_line(tag) + t1_bn_line(tag))
    if table.empty or not table["method"].isin(TOPK_METHODS).any():
        lines += ["", "(no rift / rift_bn runs found)"]
    if comparison is not None and not comparison.empty:
        lines += [
            "",
            "## RiFT with BN vs RiFT, paired on the same test images",
            "",
            "Final models of the two methods at the same k and seed, scored on the same test images; "
            f"Δ = RiFT with BN minus RiFT, pooled over the n seeds both ran (images x seeds); {TESTS_NOTE}.",
            *_comparison_block(comparison),
        ]
    if layer_table is not None and not layer_table.empty:
        lt = lambda rs: [r for r in rs if r.method in LAYER_TYPE_METHODS]
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
        "alphas",
        "n",
        "seeds",
        "test_images",
        *PAIRED_COLUMNS,
    ]
    return df[[c for c in cols if c in df.columns]]


def write_tables(
    runs: Sequence[Run], out: Path, log: Callable[[str], None] | None = None, notes: Sequence[str] = ()
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, list[Path]]:
    """Write ``table1.md`` (with ``notes`` and the comparison's), ``table1.csv``, ``rift_vs_rift_bn.csv`` (if
    any pair), ``layer_types.csv`` (if any) and ``runs.csv``; return Table 1, the layer-type table, the
    comparison and the files."""
    out.mkdir(parents=True, exist_ok=True)
    t1, lt = table1(runs, log), layer_types_table(runs)
    comparison, pair_notes = rift_vs_rift_bn(runs)
    files = [out / "table1.md", out / "table1.csv", out / "runs.csv"]
    files[0].write_text(to_markdown(t1, lt, runs, [*notes, *pair_notes], comparison))
    _csv_frame(t1).to_csv(files[1], index=False)
    run_table(runs).drop(columns="_run").to_csv(files[2], index=False)
    for name, df in (("rift_vs_rift_bn.csv", comparison), ("layer_types.csv", _csv_frame(lt))):
        if not df.empty:
            files.append(out / name)
            df.to_csv(files[-1], index=False)
    return t1, lt, comparison, files
