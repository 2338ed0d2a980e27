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
    Experiment,
    check_one_experiment,
    dataset_label,
    estimator,
    experiments,
    load,
    wandb_target,
)
from rift_bn.report.figures import plot_bn_kde, plot_interpolation, plot_layer_types, plot_mrc, save
from rift_bn.report.table import write_tables

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
    """What :func:`make_report` produced: tables, figures (by file stem), written files, skipped items.

    ``notes`` (one line each: skipped files, duplicate jobs, ``missing:`` job folders) are also in
    ``table1.md``; ``missing`` are the Hydra job folders without a ``results.json``.
    """

    out: Path
    runs: list[dict]
    table1: pd.DataFrame
    layer_types: pd.DataFrame
    figures: dict[str, Figure] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    wandb_dir: str | None = None
    experiments: list[Experiment] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    missing: list[Path] = field(default_factory=list)


def _title(e: Experiment, what: str, exps: Sequence[Experiment]) -> str:
    """``CIFAR-10 (resnet18, width 16; scale=cpu): what``: model/width only when the dataset has several."""
    extra = [f"{e.setting[1]}, width {e.setting[2]}"] if e.setting_tag != e.setting[0] else []
    extra += [e.label] if e.label else []
    detail = " (" + "; ".join(extra) + ")" if extra else ""
    return f"{dataset_label(e.setting[0])}{detail}: {what}"


def figure_layer_types(runs: list[dict], title: str = "") -> Figure | None:
    """Figures 1-2 for one experiment, or ``None`` when it has no layer-type runs with a history."""
    check_one_experiment(runs, "figure_layer_types")
    lt = [r for r in runs if r.get("method") in LAYER_TYPE_METHODS and r.get("history")]
    return plot_layer_types(lt, title or None) if lt else None


def figure_interpolation(runs: list[dict], title: str = "") -> Figure | None:
    """Interpolation curves (two or more alphas) of one experiment's RiFT / RiFT-with-BN runs, else of its
    other fine-tuned runs; ``None`` when there are none."""
    check_one_experiment(runs, "figure_interpolation")
    rs = [r for r in runs if r.get("stage") == "finetune" and len(r.get("interpolation") or []) > 1]
    topk = [r for r in rs if r.get("method") in TOPK_METHODS]
    return plot_interpolation(topk or rs, title or None) if rs else None


def _completeness(row: dict) -> tuple[bool, int]:
    """How far an MRC row got: exact rows first, then lower bounds by epochs run."""
    return row.get("status", "exact") == "exact", int(row.get("epochs_run") or 0)


def figure_mrc(runs: list[dict], method: str, title: str = "") -> Figure | None:
    """MRC chart of one method in one experiment (lowest seed; every estimator present side by side).

    Selected modules are those of the run with the largest k (rank 1 = lowest MRC).
    """
    check_one_experiment(runs, "figure_mrc")
    rs = [r for r in runs if r.get("method") == method and r.get("mrc")]
    if not rs:
        return None
    seed = min(r.get("seed") or 0 for r in rs)
    rs = [r for r in rs if (r.get("seed") or 0) == seed]
    tables: dict[str, list[dict]] = {}
    for r in sorted(rs, key=lambda r: -(r.get("k") or 0)):
        rows_by_est: dict[str, list[dict]] = {}
        for row in r["mrc"]:
            rows_by_est.setdefault(str(row.get("estimator") or estimator(r)), []).append(row)
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
    top = max((r for r in rs if estimator(r) == first_est), key=lambda r: r.get("k") or 0, default=rs[0])
    selected = [s["name"] for s in top.get("selected") or []]
    only = f" ({first_est} estimate)" if len(tables) == 1 and first_est != "exact" else ""
    full_title = (
        title or METHOD_LABELS.get(method, method)
    ) + f"{only}, seed {seed}; selected: top-{len(selected)}"
    return plot_mrc(tables, selected, full_title)


def _experiment_figures(
    e: Experiment,
    exps: Sequence[Experiment],
    kde: bool,
    kde_images: int,
    device: str | None,
    kde_per_model_attack: bool = False,
) -> list[tuple[str, Figure | None, str]]:
    """``(stem template, figure or None, why not)`` for one experiment; ``{tag}`` marks the tag's place."""
    rs = e.runs
    mrc_methods = [
        *TOPK_METHODS,
        *sorted({str(r.get("method")) for r in rs if r.get("mrc")} - set(TOPK_METHODS)),
    ]
    wanted: list[tuple[str, Figure | None, str]] = [
        (
            "fig_layer_types_{tag}",
            figure_layer_types(rs, _title(e, "fine-tuning by layer type (selection split)", exps)),
            "no layer-type runs (bn_only / conv_linear_only / full)",
        ),
        (
            "fig_interpolation_{tag}",
            figure_interpolation(rs, _title(e, "interpolation (selection split)", exps)),
            "no interpolation curves (fine-tuned runs with two or more interpolation.alphas)",
        ),
        *(
            (
                "fig_mrc_{tag}_" + m,
                figure_mrc(rs, m, _title(e, f"MRC, {METHOD_LABELS.get(m, m)}", exps)),
                f"no {m} runs with an MRC table",
            )
            for m in mrc_methods
        ),
    ]
    if kde:
        fig_why = _kde_figure(rs, _title(e, "", exps), kde_images, device, kde_per_model_attack)
        wanted.append(("fig_bn_kde_{tag}", *fig_why))
    else:
        wanted.append(("fig_bn_kde_{tag}", None, "--no-kde"))
    return wanted


def report_figures(
    runs: list[dict],
    kde: bool = True,
    kde_images: int = 256,
    device: str | None = None,
    log: Callable[[str], None] = print,
    kde_per_model_attack: bool = False,
) -> tuple[dict[str, Figure], dict[str, str]]:
    """Every figure for ``runs``, one set per experiment, by file stem; and ``{stem: reason}`` for those
    that could not be drawn. Figure 3's adversarial examples are made once on the base model, or against
    each model with ``kde_per_model_attack`` (:func:`rift_bn.report.kde.kde_samples`).

    A stem carries the setting's tag (``fig_interpolation_cifar10``) when one experiment of that setting has
    the figure, and each experiment's tag (``..._cifar10_exp2``) when several have it.
    """
    exps = experiments(runs)
    made: dict[tuple[str, str], list[tuple[Experiment, Figure | None, str]]] = {}
    for e in exps:
        for template, fig, why in _experiment_figures(e, exps, kde, kde_images, device, kde_per_model_attack):
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
    kde_images: int = 256,
    device: str | None = None,
    log: Callable[[str], None] = print,
    kde_per_model_attack: bool = False,
) -> Report:
    """Gather ``results.json`` below ``dirs``; write tables and figures to ``out`` (default: DIR/report).

    Runs are pooled over seeds only within one experiment (same config up to the seed): each experiment
    gets its own table section and figures. Figure 3 needs the runs' checkpoints and data (else skipped
    with the reason); its adversarial examples are made once on the base model with the runs' attack, or
    against each model with ``kde_per_model_attack``. W&B logging happens only when the runs logged to W&B.
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
    n_ft = sum(r.get("stage") == "finetune" for r in runs)
    exps = experiments(runs)
    log(f"{len(runs)} run(s) ({n_ft} fine-tuned, {len(exps)} experiment(s)) from {len(dirs)} folder(s)")
    t1, lt, files = write_tables(runs, out_dir, log, loaded.notes)
    figures, skipped = report_figures(runs, kde, kde_images, device, log, kde_per_model_attack)
    for stem, fig in figures.items():
        files += save(fig, out_dir, stem)
    report = Report(out_dir, runs, t1, lt, figures, files, skipped, None, exps, loaded.notes, loaded.missing)
    if wandb:
        report.wandb_dir = _log_wandb(report, log, first)
    return report


def _kde_figure(
    runs: list[dict], prefix: str, n_images: int, device: str | None, per_model_attack: bool = False
) -> tuple[Figure | None, str]:
    from rift_bn.report.kde import FINETUNED, bn_stats_text, kde_samples, plan_kde

    plan, why = plan_kde(runs)
    if plan is None:
        return None, why
    try:
        samples = kde_samples(
            plan,
            n_images=n_images,
            device=device,
            seed=int(plan.rift_bn.get("seed") or 0),
            per_model_attack=per_model_attack,
        )
    except Exception as exc:  # missing checkpoint or data, or a checkpoint that does not fit: skip, say why
        return None, f"{type(exc).__name__}: {exc}"
    made = (
        "made against each model (white-box)"
        if plan.per_model_attack
        else "made once on the base model (init) and fed to every model"
    )
    lines = [
        f"{prefix.rstrip(': ')}, top-{plan.k}, seed {plan.rift_bn.get('seed')}: BN outputs on adversarial "
        f"examples of {plan.images} selection-split images",
        f"Examples: the runs' attack, {plan.attack}, {made}. {bn_stats_text(plan)}.",
        f"Layers: {plan.layer_reason}.",
        *(f"Note: {n}." for n in [*plan.omitted, plan.data_note] if n),
    ]
    legend: dict[str, str] = {}
    for label, r in (("RiFT", plan.rift), ("RiFT with BN", plan.rift_bn)):
        if r.get("alpha") is None:
            continue
        a = float(r["alpha"])
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
        if not report.layer_types.empty:
            run.log({"layer_types": wandb.Table(dataframe=report.layer_types.astype({"k": "float"}))})
        run.log({stem: wandb.Image(str(report.out / f"{stem}.png")) for stem in report.figures})
        run_dir = str(Path(run.dir).parent)
    finally:
        run.finish()
    log(f"W&B: logged the report to project {target['project']}, group {target['group']} ({run_dir})")
    return run_dir
