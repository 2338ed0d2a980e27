"""Figures as researchers read them: layer types (Figs. 1-2), BN-output KDE (Fig. 3), MRC, interpolation.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot (no global state, any
backend; notebooks display it inline). Sizes follow a two-column paper: 3.3 in for one panel, 6.8 in
for a figure across both columns. :func:`save` writes PNG (dpi 200) and PDF.
"""

from __future__ import annotations

import contextlib
import textwrap
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import matplotlib as mpl
import numpy as np
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from rift_bn.report.collect import (
    METHOD_LABELS,
    Run,
    bn_stats_label,
    bn_stats_order,
    check_one_experiment,
)

__all__ = [
    "METHOD_COLORS",
    "TYPE_COLORS",
    "KDE_COLORS",
    "plot_bn_kde",
    "plot_interpolation",
    "plot_layer_types",
    "plot_mrc",
    "save",
    "style",
]

FULL_WIDTH = 6.8  # inches, both columns
COL_WIDTH = 3.3  # inches, one column
TYPE_COLORS: dict[str, str] = {"conv": "#4C72B0", "linear": "#55A868", "bn": "#DD8452"}
METHOD_COLORS: dict[str, str] = {
    "init": "#4D4D4D",
    "base": "#4D4D4D",
    "rift": "#4C72B0",
    "rift_bn": "#C44E52",
    "bn_only": "#DD8452",
    "conv_linear_only": "#4C72B0",
    "full": "#55A868",
}
METHOD_STYLES: dict[str, str] = {"rift": "--", "rift_bn": "-", "init": ":", "base": ":"}
BN_STATS_STYLES: dict[str, str] = {"selected": "-", "all": "--", "none": ":"}  # lines of one layer type
ALT_STYLES: tuple = (":", "-.", (0, (5, 1, 1, 1, 1, 1)), "--")  # a method's non-default BN-statistics modes
SERIES_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")  # one per k within a method
DODGE_SPAN = 0.05  # interpolation curves: total sideways spread (alpha units) that keeps equal curves apart
ESTIMATOR_HATCH: dict[str, str] = {"exact": "", "linear": "////"}


@contextlib.contextmanager
def style() -> Iterator[None]:
    """Seaborn's paper context on a white grid, fonts sized for print (no global rcParams change)."""
    rc = {
        "font.size": 8,
        "axes.titlesize": 8.5,
        "axes.labelsize": 8,
        "xtick.labelsize": 7,
        "ytick.labelsize": 7,
        "legend.fontsize": 7,
        "legend.title_fontsize": 7,
        "figure.titlesize": 9,
        "lines.linewidth": 1.4,
        "lines.markersize": 4,
        "pdf.fonttype": 42,
        "svg.fonttype": "none",
    }
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"), mpl.rc_context(rc):
        yield


def save(fig: Figure, out: Path, stem: str, dpi: int = 200) -> list[Path]:
    """Write ``out/stem.png`` (``dpi``) and ``out/stem.pdf``; return both paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    fig.savefig(paths[0], dpi=dpi, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    return paths


def _mean_std(curves: Sequence[Sequence[tuple[float, float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, mean, std (ddof=1, 0 for one curve) over curves given as (x, y) points, on their common x."""
    xs = sorted(set.intersection(*(set(x for x, _ in c) for c in curves)))
    ys = np.array([[dict(c)[x] for x in xs] for c in curves], dtype=float)
    std = ys.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(len(xs))
    return np.array(xs, dtype=float), ys.mean(axis=0), std


def _percent_axes(ax: mpl.axes.Axes, ylabel: str) -> None:
    ax.set_ylabel(ylabel)
    ax.yaxis.set_major_formatter(mpl.ticker.FormatStrFormatter("%g"))


def _legend_below(fig: Figure, handles: list, labels: list[str], ncol: int | None = None) -> None:
    ncol = ncol or min(len(labels), 4)
    fig.legend(handles, labels, loc="outside lower center", ncol=ncol, frameon=False)


def _column_legend(fig: Figure, columns: list[list[tuple[object, str]]]) -> None:
    """A legend below the axes with one column per group (padded so that groups never share a column)."""
    rows = max(len(c) for c in columns)
    blank = mpl.lines.Line2D([], [], linestyle="none")
    handles = [h for c in columns for h, _ in c + [(blank, "")] * (rows - len(c))]
    labels = [t for c in columns for _, t in c + [(blank, "")] * (rows - len(c))]
    fig.legend(handles, labels, loc="outside lower center", ncol=len(columns), frameon=False)


def _several_modes(keys: Sequence[tuple]) -> set[str]:
    """Methods that occur with more than one BN-statistics mode among ``(method, bn_stats, ...)`` keys."""
    seen: dict[str, set[str]] = {}
    for key in keys:
        seen.setdefault(key[0], set()).add(key[1])
    return {m for m, modes in seen.items() if len(modes) > 1}


def plot_layer_types(runs: list[Run], title: str | None = None) -> Figure:
    """Figures 1-2: clean and robust accuracy (selection split) per fine-tuning epoch, a line per layer type.

    ``runs`` are the bn_only / conv_linear_only / full runs of one experiment (``ValueError`` otherwise);
    epoch 0 is the base model. Several seeds give the mean line and a ±1 std band; runs of one layer type
    with different ``finetune.bn_stats`` are separate lines, never seeds of one.
    """
    check_one_experiment(runs, "plot_layer_types")
    by_method: dict[tuple[str, str], list[list[dict[str, float]]]] = {}
    for r in runs:
        if r.method and r.results.history:
            by_method.setdefault((r.method, r.bn_stats), []).append(r.results.history)
    rank = {m: i for i, m in enumerate(("bn_only", "conv_linear_only", "full"))}
    order = sorted(by_method, key=lambda mb: (rank.get(mb[0], 9), mb[0], bn_stats_order(*mb)))
    several = _several_modes(order)
    with style():
        fig = Figure(figsize=(FULL_WIDTH, 2.6), layout="constrained")
        axes = fig.subplots(1, 2)
        for ax, metric, quantity in zip(
            axes, ("clean_acc", "robust_acc"), ("Clean", "Robust (PGD)"), strict=True
        ):
            for m in order:
                curves = [[(h["epoch"], h[metric]) for h in hist] for hist in by_method[m]]
                x, mean, std = _mean_std(curves)
                n = len(curves)
                color = METHOD_COLORS.get(m[0])
                label = METHOD_LABELS.get(m[0], m[0]) + (bn_stats_label(m[1]) if m[0] in several else "")
                ax.plot(
                    x,
                    mean,
                    marker="o",
                    color=color,
                    linestyle=BN_STATS_STYLES.get(m[1], "-") if m[0] in several else "-",
                    label=label + (f" (n={n})" if n > 1 else ""),
                )
                if n > 1:
                    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
            ax.set_xlabel("Fine-tuning epoch (0 = base)")
            _percent_axes(ax, f"{quantity} accuracy (%)")
            ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
        handles, labels = axes[0].get_legend_handles_labels()
        if any(len(c) > 1 for c in by_method.values()):
            handles.append(Patch(facecolor="#999999", alpha=0.3, label="±1 std over seeds"))
            labels.append("±1 std over seeds")
        _legend_below(fig, handles, labels, ncol=len(labels))
        fig.suptitle(title or "Fine-tuning by layer type (selection split)")
    return fig


def plot_interpolation(runs: list[Run], title: str | None = None) -> Figure:
    """Clean and robust accuracy (selection split) against alpha, one line per (method, finetune.bn_stats, k,
    MRC estimator).

    ``runs`` must be one experiment (``ValueError`` otherwise). Several seeds per line give the mean line;
    the star sits at the most frequent alpha*. A method run with several BN-statistics modes gets a legend
    column per mode (``RiFT with BN (BN stats: none), k=1``).
    """
    check_one_experiment(runs, "plot_interpolation")
    series: dict[tuple[str, str, int | None, str], list[Run]] = {}
    for r in runs:
        if r.method and r.results.interpolation:
            series.setdefault((r.method, r.bn_stats, r.k, r.row_estimator), []).append(r)
    keys = sorted(
        series,
        key=lambda mk: (
            ("rift", "rift_bn").index(mk[0]) if mk[0] in ("rift", "rift_bn") else 9,
            mk[0],
            bn_stats_order(mk[0], mk[1]),
            mk[3] != "exact",
            mk[3],
            mk[2] or 0,
        ),
    )
    several = _several_modes(keys)
    methods = list(dict.fromkeys((m, b) for m, b, _, _ in keys))
    # Curves often coincide (two k that select the same modules, alpha* = 0 for several runs): each series
    # is shifted a little sideways and gets its own marker, so no line or star hides another.
    step = min(0.015, DODGE_SPAN / (len(keys) - 1)) if len(keys) > 1 else 0.0
    dodge = {key: step * (i - (len(keys) - 1) / 2) for i, key in enumerate(keys)}
    # the legend below takes a row per curve of its longest column: the figure grows with it, so the axes
    # keep room for their labels
    rows = max(2, *(sum((m, b) == mb for m, b, _, _ in keys) for mb in methods))
    with style():
        fig = Figure(figsize=(FULL_WIDTH, 2.2 + 0.2 * rows), layout="constrained")
        axes = fig.subplots(1, 2)
        columns: list[list[tuple[object, str]]] = []
        for method, mode in methods:
            columns.append([])
            ks = [(k, est) for m, b, k, est in keys if (m, b) == (method, mode)]
            base = METHOD_COLORS.get(method, "#777777")
            shades = sns.light_palette(base, n_colors=len(ks) + 2)[2:] if len(ks) > 1 else [base]
            # the method's first (default) mode keeps its line style; its other modes get other styles
            others = [b for m, b in methods if m == method]
            style_ = METHOD_STYLES.get(method, "-")
            if others.index(mode) > 0:
                alt = [st for st in ALT_STYLES if st != style_]
                style_ = alt[(others.index(mode) - 1) % len(alt)]
            for i, (color, (k, est)) in enumerate(zip(shades, ks, strict=True)):
                rs = series[(method, mode, k, est)]
                shift = dodge[(method, mode, k, est)]
                alphas = Counter(r.results.alpha for r in rs if r.results.alpha is not None)
                a_star = min(alphas, key=lambda a: (-alphas[a], a)) if alphas else None
                label = METHOD_LABELS.get(method, method)
                label += bn_stats_label(mode) if method in several else ""
                label += f", k={k}" if k is not None else ""
                label += f" ({est} MRC)" if est not in ("", "exact") else ""
                label += f" (n={len(rs)})" if len(rs) > 1 else ""
                for ax, metric in zip(axes, ("clean_acc", "robust_acc"), strict=True):
                    x, mean, _ = _mean_std(
                        [[(p["alpha"], p[metric]) for p in r.results.interpolation] for r in rs]
                    )
                    (line,) = ax.plot(
                        x + shift,
                        mean,
                        color=color,
                        linestyle=style_,
                        marker=SERIES_MARKERS[i % len(SERIES_MARKERS)],
                        markersize=3.5,
                        alpha=0.9,
                        label=label,
                    )
                    if a_star is not None and np.isclose(x, a_star).any():
                        ax.scatter(
                            [a_star + shift],
                            [mean[np.isclose(x, a_star)][0]],
                            marker="*",
                            s=70,
                            color=color,
                            edgecolor="black",
                            linewidth=0.5,
                            zorder=5,
                        )
                columns[-1].append((line, label))
        for ax, name in zip(axes, ("Clean", "Robust (PGD)"), strict=True):
            ax.set_xlabel(r"Interpolation factor $\alpha$")
            _percent_axes(ax, f"{name} accuracy (%)")
        star = mpl.lines.Line2D(
            [],
            [],
            marker="*",
            color="white",
            markerfacecolor="#999999",
            markeredgecolor="black",
            markersize=9,
            linestyle="none",
        )
        notes = [(star, r"chosen $\alpha^*$")]
        if step:
            offset = max(abs(d) for d in dodge.values())
            blank = mpl.lines.Line2D([], [], linestyle="none")
            text = rf"curves offset $\pm${offset:.2g} in $\alpha$" + "\nso that none hides another"
            notes.append((blank, text))
        _column_legend(fig, [*columns, notes])
        fig.suptitle(
            title
            or r"Interpolation $\theta(\alpha) = (1-\alpha)\,\theta_{AT} + \alpha\,\theta_{FT}$"
            " (selection split)"
        )
    return fig


def plot_mrc(
    tables: Mapping[str, Sequence[dict]], selected: Sequence[str] = (), title: str | None = None
) -> Figure:
    """Per module: MRC (top) and robust-accuracy drop (bottom), bars coloured by layer type.

    ``tables`` maps an estimator name (``exact``, ``linear``) to its MRC rows; several estimators are drawn
    side by side (hatched = linear). ``selected`` modules (lowest MRC first) get a black edge and their
    rank above the bar. A ``lower_bound`` row (``mrc.exact_lowest``: the module was stopped once it could
    no longer be among the lowest) is no value: it gets no bar, only an open upward triangle at its bound
    (the MRC lies at or above it), and nothing in the robust-accuracy panel.
    """
    names: list[str] = []
    types: dict[str, str] = {}
    for rows in tables.values():
        for row in rows:
            if row["name"] not in types:
                names.append(row["name"])
                types[row["name"]] = row.get("type", "?")
    rank = {name: i + 1 for i, name in enumerate(selected)}
    ests = list(tables)
    width = 0.8 / len(ests)
    x = np.arange(len(names))
    with style():
        fig = Figure(figsize=(FULL_WIDTH, 4.4), layout="constrained")
        ax_mrc, ax_drop = fig.subplots(2, 1, sharex=True)
        for i, est in enumerate(ests):
            by_name = {row["name"]: row for row in tables[est]}
            offset = (i - (len(ests) - 1) / 2) * width
            bounded = {n for n, row in by_name.items() if row.get("status") == "lower_bound"}
            for ax, key in ((ax_mrc, "mrc"), (ax_drop, "robust_acc_drop")):
                vals = [None if n in bounded else by_name.get(n, {}).get(key) for n in names]
                vals = [np.nan if v is None else float(v) for v in vals]
                colors = [TYPE_COLORS.get(types[n], "#999999") for n in names]
                edges = ["black" if n in rank else "none" for n in names]
                ax.bar(
                    x + offset,
                    vals,
                    width=width,
                    color=colors,
                    edgecolor=edges,
                    linewidth=0.9,
                    hatch=ESTIMATOR_HATCH.get(est, "...") if len(ests) > 1 else None,
                    label=est,
                )
            at = [j for j, n in enumerate(names) if n in bounded]
            if at:  # a lower bound, not a value: an open marker pointing up, no bar
                ax_mrc.scatter(
                    x[at] + offset,
                    [float(by_name[names[j]]["mrc"]) for j in at],
                    marker="^",
                    s=14,
                    facecolors="none",
                    edgecolors=[TYPE_COLORS.get(types[names[j]], "#999999") for j in at],
                    linewidths=0.9,
                    zorder=3,
                    label=f"{est} lower bound",
                )
            if i == 0:
                for n in rank:
                    if by_name.get(n, {}).get("mrc") is not None:
                        j = names.index(n)
                        ax_mrc.annotate(
                            str(rank[n]),
                            (x[j] + offset, float(by_name[n]["mrc"])),
                            xytext=(0, 1.5),
                            textcoords="offset points",
                            ha="center",
                            va="bottom",
                            fontsize=6,
                            fontweight="bold",
                        )
        all_mrc = np.array(
            [row["mrc"] for rows in tables.values() for row in rows if row.get("mrc") is not None],
            dtype=float,
        )
        log_scale = bool(len(all_mrc) and (all_mrc > 0).all() and all_mrc.max() / all_mrc.min() > 30)
        if log_scale:
            ax_mrc.set_yscale("log")
        ax_mrc.set_ylabel("MRC\n(loss increase" + (", log)" if log_scale else ")"))
        ax_drop.set_ylabel("Robust-acc. drop\n(% points)")
        ax_drop.set_xticks(x, names, rotation=90, fontsize=5.5)
        ax_drop.set_xlim(-0.6, len(names) - 0.4)
        for ax in (ax_mrc, ax_drop):
            ax.grid(axis="x", visible=False)
        for label in ax_drop.get_xticklabels():
            if label.get_text() in rank:
                label.set_fontweight("bold")
        present = [t for t in TYPE_COLORS if t in types.values()]
        handles = [
            Patch(facecolor=TYPE_COLORS[t], label={"bn": "BN"}.get(t, t.capitalize())) for t in present
        ]
        handles.append(
            Patch(facecolor="white", edgecolor="black", label="selected (number = rank, lowest MRC first)")
        )
        if any(row.get("status") == "lower_bound" for rows in tables.values() for row in rows):
            handles.append(
                mpl.lines.Line2D(
                    [],
                    [],
                    marker="^",
                    linestyle="none",
                    markerfacecolor="none",
                    markeredgecolor="black",
                    label="lower bound (MRC >= it; not run to the end)",
                )
            )
        if len(ests) > 1:
            handles += [
                Patch(facecolor="#BBBBBB", hatch=ESTIMATOR_HATCH.get(e, "..."), label=f"{e} estimate")
                for e in ests
            ]
        ncol = len(handles) if len(handles) <= 4 else -(-len(handles) // 2)
        fig.legend(handles=handles, loc="outside lower center", ncol=ncol, frameon=False)
        fig.align_ylabels([ax_mrc, ax_drop])
        if title:
            fig.suptitle(title)
    return fig


KDE_COLORS: dict[str, str] = {
    "init": METHOD_COLORS["init"],
    "RiFT": METHOD_COLORS["rift"],
    "RiFT with BN": METHOD_COLORS["rift_bn"],
    "RiFT (fine-tuned)": "#8DA9D9",
    "RiFT with BN (fine-tuned)": "#E39A9C",
}
KDE_STYLES: dict[str, object] = {
    "init": ":",
    "RiFT": "--",
    "RiFT with BN": "-",
    "RiFT (fine-tuned)": "-.",
    "RiFT with BN (fine-tuned)": (0, (5, 1, 1, 1, 1, 1)),
}


def plot_bn_kde(
    samples: Mapping[str, Mapping[str, np.ndarray]],
    title: str | None = None,
    panel_note: Mapping[str, str] | None = None,
    legend_labels: Mapping[str, str] | None = None,
) -> Figure:
    """Figure 3: KDE of BN-layer outputs on adversarial examples, one panel per layer, one line per model.

    ``samples[layer][model]`` is a 1-D array of output values, ``model`` in ``init``, ``RiFT``,
    ``RiFT with BN`` (theta(alpha*)) and ``RiFT (fine-tuned)``, ``RiFT with BN (fine-tuned)`` (alpha = 1),
    see :func:`rift_bn.report.kde.kde_samples`; ``panel_note[layer]`` is added to a panel title,
    ``legend_labels[model]`` replaces the model's legend text (e.g. with its alpha*). ``title`` may have
    several lines (a caption: which examples, which layers); each is wrapped to the figure's width.
    """
    panel_note, legend_labels = panel_note or {}, legend_labels or {}
    layers = list(samples)
    ncols = min(len(layers), 2)
    nrows = -(-len(layers) // ncols)
    width = FULL_WIDTH if ncols > 1 else 4.6
    with style():
        fig = Figure(figsize=(width, 2.4 * nrows + 0.9), layout="constrained")
        axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
        handles: dict[str, object] = {}
        for ax, layer in zip(axes, layers, strict=False):
            for label, values in samples[layer].items():
                lo, hi = np.percentile(values, [0.5, 99.5])
                sns.kdeplot(
                    x=values,
                    ax=ax,
                    color=KDE_COLORS.get(label),
                    linestyle=KDE_STYLES.get(label, "-"),
                    label=legend_labels.get(label, label),
                    clip=(lo - 0.5 * (hi - lo), hi + 0.5 * (hi - lo)),
                    bw_adjust=1.0,
                )
                handles.setdefault(label, ax.lines[-1])
            all_vals = np.concatenate([np.asarray(v) for v in samples[layer].values()])
            lo, hi = np.percentile(all_vals, [0.5, 99.5])
            ax.set_xlim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
            ax.set_title(layer + (f" ({panel_note[layer]})" if layer in panel_note else ""), fontsize=7.5)
            ax.set_xlabel("BN output value")
            ax.set_ylabel("Density")
        for ax in axes[len(layers) :]:
            ax.set_visible(False)
        # one legend column per model family: init | RiFT theta(alpha*), fine-tuned | RiFT with BN ...
        groups = [["init"], ["RiFT", "RiFT (fine-tuned)"], ["RiFT with BN", "RiFT with BN (fine-tuned)"]]
        groups += [[k] for k in handles if not any(k in g for g in groups)]
        columns = [[(handles[k], legend_labels.get(k, k)) for k in g if k in handles] for g in groups]
        _column_legend(fig, [c for c in columns if c])
        if title:
            chars = int(width * 15)  # about 15 characters per inch at the title's font size
            fig.suptitle(
                "\n".join(textwrap.fill(line, chars, break_on_hyphens=False) for line in title.splitlines()),
                fontsize=7.5,
            )
    return fig
