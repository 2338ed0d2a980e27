"""Assemble the report folder: tables, figures, optional W&B upload (``python -m rift_bn.report``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from rift_bn.report.collect import (
    LAYER_TYPE_METHODS,
    METHOD_LABELS,
    TOPK_METHODS,
    ExperimentRuns,
    Run,
    check_one_experiment,
    dataset_label,
    experiments,
    load,
    wandb_target,
)
from rift_bn.report.corruptions import figure_corruptions, write_corruption_tables
from rift_bn.report.figures import plot_bn_kde, plot_interpolation, plot_layer_types, plot_mrc, save
from rift_bn.report.table import fmt, write_tables

__all__ = [
    "Report",
    "figure_interpolation",
    "figure_layer_types",
    "figure_mrc",
    "make_report",
    "report_figures",
]


@dataclass
class Report:
    """What :func:`make_report` produced: tables (``comparison``: RiFT with BN vs RiFT, paired), figures
    (by file stem), written files, skipped items.

    ``notes`` (one line each: skipped files, duplicate jobs, ``missing:`` job folders) are also in
    ``table1.md``; ``missing`` are the Hydra job folders without a ``results.json``.
    """

    out: Path
    runs: list[Run]
    table1: pd.DataFrame
    layer_types: pd.DataFrame
    comparison: pd.DataFrame
    figures: dict[str, Figure] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    wandb_dir: str | None = None
    experiments: list[ExperimentRuns] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    missing: list[Path] = field(default_factory=list)


def _title(e: ExperimentRuns, what: str) -> str:
    """``CIFAR-10 (resnet18, width 16; scale=cpu): what``: model/width only when the dataset has several."""
    extra = [f"{e.setting[1]}, width {e.setting[2]}"] if e.setting_tag != e.setting[0] else []
    extra += [e.label] if e.label else []
    detail = " (" + "; ".join(extra) + ")" if extra else ""
    return f"{dataset_label(e.setting[0])}{detail}: {what}"


def figure_layer_types(runs: list[Run], title: str = "") -> Figure | None:
    """Figures 1-2 for one experiment, or ``None`` when it has no layer-type runs with a history."""
    check_one_experiment(runs, "figure_layer_types")
    lt = [r for r in runs if r.method in LAYER_TYPE_METHODS and r.results.history]
    return plot_layer_types(lt, title or None) if lt else None


def figure_interpolation(runs: list[Run], title: str = "") -> Figure | None:
    """Interpolation curves (two or more alphas) of one experiment's RiFT / RiFT-with-BN runs, else of its
    other fine-tuned runs; ``None`` when there are none."""
    check_one_experiment(runs, "figure_interpolation")
    rs = [r for r in runs if r.method and len(r.results.interpolation) > 1]
    topk = [r for r in rs if r.method in TOPK_METHODS]
    return plot_interpolation(topk or rs, title or None) if rs else None


def _completeness(row: dict) -> tuple[bool, int]:
    """How far an MRC row got: exact rows first, then lower bounds by epochs run."""
    return row.get("status", "exact") == "exact", int(row.get("epochs_run") or 0)


def figure_mrc(runs: list[Run], method: str, title: str = "") -> Figure | None:
    """MRC chart of one method in one experiment (lowest seed; every estimator present side by side).

    Selected modules are those of the run with the largest k (rank 1 = lowest MRC).
    """
    check_one_experiment(runs, "figure_mrc")
    rs = [r for r in runs if r.method == method and r.results.mrc]
    if not rs:
        return None
    seed = min(r.seed for r in rs)
    rs = [r for r in rs if r.seed == seed]
    tables: dict[str, list[dict]] = {}
    for r in sorted(rs, key=lambda r: -(r.k or 0)):
        rows_by_est: dict[str, list[dict]] = {}
        for row in r.results.mrc:
            rows_by_est.setdefault(str(row.get("estimator") or r.estimator), []).append(row)
        for est, rows in rows_by_est.items():
            if est not in tables:
                tables[est] = list(rows)
                continue
            # mrc.exact_lowest: jobs of one sweep saw the shared table at different times; per module the
            # most complete row wins (exact over a lower bound, else the bound after the most epochs)
            at = {row["name"]: j for j, row in enumerate(tables[est])}
            for row in rows:
                j = at.get(row["name"])
                if j is not None and _completeness(row) > _completeness(tables[est][j]):
                    tables[est][j] = row
    tables = dict(sorted(tables.items(), key=lambda kv: (kv[0] != "exact", kv[0])))
    first_est = next(iter(tables))
    top = max((r for r in rs if r.estimator == first_est), key=lambda r: r.k or 0, default=rs[0])
    selected = [s["name"] for s in top.results.selected]
    only = f" ({first_est} estimate)" if len(tables) == 1 and first_est != "exact" else ""
    full_title = (
        title or METHOD_LABELS.get(method, method)
    ) + f"{only}, seed {seed}; selected: top-{len(selected)}"
    return plot_mrc(tables, selected, full_title)


def _experiment_figures(e: ExperimentRuns, kde: bool) -> list[tuple[str, Figure | None, str]]:
    """``(stem template, figure or None, why not)`` for one experiment; ``{tag}`` marks the tag's place."""
    rs = e.runs
    mrc_methods = [
        *TOPK_METHODS,
        *sorted({str(r.method) for r in rs if r.results.mrc} - set(TOPK_METHODS)),
    ]
    wanted: list[tuple[str, Figure | None, str]] = [
        (
            "fig_layer_types_{tag}",
            figure_layer_types(rs, _title(e, "fine-tuning by layer type (selection split)")),
            "no layer-type runs (bn_only / conv_linear_only / full)",
        ),
        (
            "fig_interpolation_{tag}",
            figure_interpolation(rs, _title(e, "interpolation (selection split)")),
            "no interpolation curves (fine-tuned runs with two or more interpolation.alphas)",
        ),
        *(
            (
                "fig_mrc_{tag}_" + m,
                figure_mrc(rs, m, _title(e, f"MRC, {METHOD_LABELS.get(m, m)}")),
                f"no {m} runs with an MRC table",
            )
            for m in mrc_methods
        ),
    ]
    if kde:
        wanted.append(("fig_bn_kde_{tag}", *_kde_figure(rs, _title(e, ""))))
    else:
        wanted.append(("fig_bn_kde_{tag}", None, "--no-kde"))
    shift = figure_corruptions(rs, _title(e, "accuracy under common corruptions (test set)"))
    if shift is not None:  # only experiments run with eval.corruptions
        wanted.append(("fig_corruptions_{tag}", shift, ""))
    return wanted


def report_figures(
    runs: list[Run], kde: bool = True, log: Callable[[str], None] = print
) -> tuple[dict[str, Figure], dict[str, str]]:
    """Every figure for ``runs``, one set per experiment, by file stem; and ``{stem: reason}`` for those
    that could not be drawn. Figure 3 is drawn from the BN outputs the runs saved
    (:func:`rift_bn.report.kde.kde_samples`).

    A stem carries the setting's tag (``fig_interpolation_cifar10``) when one experiment of that setting has
    the figure, and each experiment's tag (``..._cifar10_exp2``) when several have it.
    """
    made: dict[tuple[str, str], list[tuple[ExperimentRuns, Figure | None, str]]] = {}
    for e in experiments(runs):
        for template, fig, why in _experiment_figures(e, kde):
            made.setdefault((e.setting_tag, template), []).append((e, fig, why))
    figures: dict[str, Figure] = {}
    skipped: dict[str, str] = {}
    for (setting_tag, template), items in made.items():
        drawn = [(e, fig) for e, fig, _ in items if fig is not None]
        if len(drawn) == 1:
            figures[template.format(tag=setting_tag)] = drawn[0][1]
        elif drawn:
            figures.update({template.format(tag=e.tag): fig for e, fig in drawn})
        else:
            whys = list(dict.fromkeys(why for _, _, why in items))
            stem = template.format(tag=setting_tag)
            skipped[stem] = whys[0] if len(whys) == 1 else "; ".join(f"{e.tag}: {why}" for e, _, why in items)
            if kde and template.startswith("fig_bn_kde"):
                log(f"Figure 3 ({stem}) skipped: {skipped[stem]}")
    return figures, skipped


def make_report(
    dirs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] | None = None,
    kde: bool = True,
    wandb: bool = True,
    log: Callable[[str], None] = print,
) -> Report:
    """Gather ``results.json`` below ``dirs``; write tables and figures to ``out`` (default: DIR/report).

    Runs are pooled over seeds only within one experiment (same config up to the seed): each experiment
    gets its own table section and figures. Figure 3 is drawn from the BN outputs the runs saved (else
    skipped with the reason). W&B logging happens only when the runs logged to W&B.
    """
    if not dirs:
        raise ValueError("give at least one run or sweep directory")
    first = Path(dirs[0])
    out_dir = Path(out) if out is not None else (first.parent if first.is_file() else first) / "report"
    out_dir = out_dir.resolve()
    loaded = load(dirs, exclude=out_dir)
    runs = loaded.runs
    if not runs:
        failed = f" ({len(loaded.missing)} job folder(s) without one)" if loaded.missing else ""
        raise FileNotFoundError(f"no complete results.json below {', '.join(map(str, dirs))}{failed}")
    n_ft = sum(bool(r.method) for r in runs)
    exps = experiments(runs)
    log(f"{len(runs)} run(s) ({n_ft} fine-tuned, {len(exps)} experiment(s)) from {len(dirs)} folder(s)")
    t1, lt, comparison, files = write_tables(runs, out_dir, log, loaded.notes)
    files += write_corruption_tables(runs, out_dir)  # eval.corruptions runs only
    files += write_bn_shift(exps, out_dir)  # runs that saved BN outputs only
    figures, skipped = report_figures(runs, kde, log)
    for stem, fig in figures.items():
        files += save(fig, out_dir, stem)
    report = Report(
        out_dir, runs, t1, lt, comparison, figures, files, skipped, None, exps, loaded.notes, loaded.missing
    )
    if wandb:
        report.wandb_dir = _log_wandb(report, log, first)
    return report


def write_bn_shift(exps: Sequence[ExperimentRuns], out: Path) -> list[Path]:
    """``bn_shift.md`` and ``bn_shift.csv`` (:func:`rift_bn.report.kde.bn_shift` per experiment, the
    Markdown as mean ± std over seeds per k and model) when some pair of runs saved BN outputs."""
    from rift_bn.report.kde import bn_shift

    shifts = [(e, bn_shift(e.runs)) for e in exps]
    shifts = [(e, t) for e, t in shifts if not t.empty]
    if not shifts:
        return []
    lines = [
        "## Figure 3 in numbers: how far the BN outputs moved",
        "",
        "Per (k, seed): the 1-D Wasserstein distance between the base model's outputs and each model's, on "
        "the same adversarial examples of the selection split, in units of the base outputs' std, averaged "
        "over the BN layers RiFT with BN selected (Figure 3's layers); mean ± sample std over n seeds. "
        "θ(α*) is the reported model, fine-tuned is α = 1.",
    ]
    for e, t in shifts:
        wide = t.groupby(["k", "model"], sort=False)["shift"].agg(["mean", "std", "count"]).reset_index()
        models = list(dict.fromkeys(t["model"]))
        lines += ["", f"### {_title(e, 'BN output shift from the base')}", ""]
        lines += ["| Top k | " + " | ".join(models) + " | n |", "|---|" + "---:|" * (len(models) + 1)]
        for k, g in wide.groupby("k"):
            by = g.set_index("model")
            cells = [fmt(by.loc[m, "mean"], by.loc[m, "std"], digits=3) for m in models]
            lines.append(f"| Top {k} | " + " | ".join(cells) + f" | {int(by['count'].max())} |")
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "bn_shift.md", out / "bn_shift.csv"]
    files[0].write_text("\n".join(lines) + "\n")
    pd.concat([t.assign(experiment=e.tag) for e, t in shifts]).to_csv(files[1], index=False)
    return files


def _kde_figure(runs: list[Run], prefix: str) -> tuple[Figure | None, str]:
    from rift_bn.report.kde import FINETUNED, bn_stats_text, kde_samples, plan_kde

    plan, why = plan_kde(runs)
    if plan is None:
        return None, why
    try:
        samples = kde_samples(plan)
    except (OSError, ValueError) as exc:  # a run without the file, or files that do not match: say why
        return None, str(exc)
    lines = [
        f"{prefix.rstrip(': ')}, top-{plan.k}, seed {plan.rift_bn.seed}: BN outputs on adversarial "
        f"examples of {plan.images} selection-split images",
        f"Examples: the runs' attack, {plan.attack}, made once on the base model (init) and fed to every "
        f"model. {bn_stats_text(plan)}.",
        f"Layers: {plan.layer_reason}.",
    ]
    legend: dict[str, str] = {}
    for label, r in (("RiFT", plan.rift), ("RiFT with BN", plan.rift_bn)):
        if r.results.alpha is None:
            continue
        a = float(r.results.alpha)
        same = {0.0: " = init", 1.0: " = fine-tuned"}.get(a, "")
        legend[label] = f"{label} $\\theta(\\alpha^*)$, $\\alpha^*$={a:g}{same}"
        legend[FINETUNED[label]] = f"{label} fine-tuned ($\\alpha$=1)"
    return plot_bn_kde(samples, "\n".join(lines), plan.notes, legend), ""


def _log_wandb(report: Report, log: Callable[[str], None], first: Path | None = None) -> str | None:
    """A ``job_type="report"`` W&B run with Table 1 and every figure, in the runs' project and the group of
    the report's first folder (where the report is written)."""
    target = wandb_target(report.runs, first)
    if target is None:
        return None
    if os.environ.get("WANDB_MODE") == "disabled":
        log("W&B: not logged (WANDB_MODE=disabled)")
        return None
    import wandb

    run = wandb.init(
        project=target["project"],
        entity=target["entity"],
        group=target["group"],
        job_type="report",
        name=f"report-{target['group']}",
        mode=os.environ.get("WANDB_MODE", "offline"),
        dir=str(report.out),
        config={
            "groups": target["groups"],
            "runs": len(report.runs),
            "experiments": {e.tag: e.label for e in report.experiments},
        },
    )
    try:
        run.log({"table1": wandb.Table(dataframe=report.table1.astype({"k": "float"}))})
        if not report.comparison.empty:
            run.log({"rift_vs_rift_bn": wandb.Table(dataframe=report.comparison)})
        if not report.layer_types.empty:
            run.log({"layer_types": wandb.Table(dataframe=report.layer_types.astype({"k": "float"}))})
        run.log({stem: wandb.Image(str(report.out / f"{stem}.png")) for stem in report.figures})
        run_dir = str(Path(run.dir).parent)
    finally:
        run.finish()
    log(f"W&B: logged the report to project {target['project']}, group {target['group']} ({run_dir})")
    return run_dir
