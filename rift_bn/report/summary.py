"""What the console shows: the summary printed at the end of every job (:func:`format_summary`), and the
table of a multirun's jobs printed when the sweep ends (:class:`SweepSummary`, a Hydra callback); both
read the run's record (:mod:`rift_bn.results`)."""

from __future__ import annotations

import shlex
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from rift_bn.errors import UserError
from rift_bn.results import Results, load

KIND_ORDER = ("conv", "linear", "bn")


def _layer_type_method(r: Results) -> bool:
    """A method that fine-tunes every module of some layer types (full, bn_only, conv_linear_only): no MRC."""
    selection = (r.config.get("method") or {}).get("selection")
    if selection is not None:
        return selection == "all"
    return bool(r.selected) and all(s.get("mrc") is None for s in r.selected)


def selected_text(r: Results) -> str:
    """The fine-tuned modules: each one with its MRC (rift, rift_bn), or ``all 41 modules (20 conv, 1 linear,
    20 bn)`` for the layer-type methods."""
    if _layer_type_method(r):
        kinds = Counter(s.get("type", "?") for s in r.selected)
        order = [k for k in KIND_ORDER if k in kinds] + sorted(set(kinds) - set(KIND_ORDER))
        return f"all {len(r.selected)} modules ({', '.join(f'{kinds[k]} {k}' for k in order)})"
    return ", ".join(
        f"{s['name']} ({s['type']}" + (f", mrc {s['mrc']:.4f})" if s.get("mrc") is not None else ")")
        for s in r.selected
    )


def format_summary(r: Results) -> str:
    """A few readable lines: what ran, base vs final test accuracy, deltas, selection, alpha*, timings."""
    e = r.experiment
    head = f"{e.stage} | {e.dataset} {e.model} (width {e.width}) | seed {e.seed}"
    if e.method:
        head += f" | method {e.method}" + (f" k={e.k}" if e.k else "")
        head += f" | BN stats: {e.bn_stats}" if e.bn_stats else ""
    lines = [head, f"  {'':8s}{'clean':>9s}{'robust':>9s}"]
    for name, acc in (("base", r.base), ("final", r.final)):
        lines.append(f"  {name:8s}{acc['clean_acc']:8.2f}%{acc['robust_acc']:8.2f}%")
    if e.stage == "finetune":
        d = r.delta
        lines.append(f"  {'delta':8s}{d['clean_acc']:+8.2f} {d['robust_acc']:+8.2f}")
        lines.append(f"  selected: {selected_text(r)}")
        mrc = f"   mrc: {r.mrc_source}" if r.mrc_source else ""
        lines.append(f"  alpha*: {r.alpha}{mrc}")
    lines.append("  timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in r.timings.items()))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- a sweep's table

_COLUMNS = ("job", "data", "method", "k", "bn_stats", "seed", "clean", "robust", "Δclean", "Δrobust")
_COLUMNS += ("alpha*", "test images")


def _job_number(path: Path) -> tuple[int, str]:
    name = path.name
    return (int(name), name) if name.isdigit() else (sys.maxsize, name)


def _cell(value: Any, fmt: str = "") -> str:
    if value is None:
        return "-"
    return format(value, fmt) if fmt else str(value)


def sweep_rows(sweep_dir: Path) -> tuple[list[list[str]], list[Path]]:
    """One row per job folder of a sweep (``<sweep>/<n>/results.json``, by job number), and the job folders
    (they hold ``.hydra/``) without a ``results.json``."""
    rows: list[list[str]] = []
    missing: list[Path] = []
    jobs = [
        p
        for p in sweep_dir.iterdir()
        if p.is_dir() and ((p / "results.json").exists() or (p / ".hydra").is_dir())
    ]
    for job in sorted(jobs, key=_job_number):
        try:
            r = load(job / "results.json")
        except UserError:
            missing.append(job)
            continue
        e = r.experiment
        finetuned = e.stage == "finetune"
        rows.append(
            [
                job.name,
                _cell(e.dataset),
                _cell(e.method if finetuned else "base (at)"),
                _cell(e.k if finetuned and e.k is not None else ("all" if finetuned else None)),
                _cell(e.bn_stats),
                _cell(e.seed),
                _cell(r.final.get("clean_acc"), ".2f"),
                _cell(r.final.get("robust_acc"), ".2f"),
                _cell(r.delta.get("clean_acc") if finetuned else None, "+.2f"),
                _cell(r.delta.get("robust_acc") if finetuned else None, "+.2f"),
                _cell(None if r.alpha is None else float(r.alpha)),
                _cell(r.test_size),
            ]
        )
    return rows, missing


def format_sweep(sweep_dir: str | Path) -> str:
    """The sweep's jobs as one compact table (test accuracy of the final model, in percent; deltas against
    the base model), the job folders without results, and the command of the full report."""
    sweep = Path(sweep_dir)
    rows, missing = sweep_rows(sweep)
    lines = [
        f"sweep {sweep}: {len(rows)} job(s) with results" + (f", {len(missing)} without" if missing else "")
    ]
    if rows:
        table = [list(_COLUMNS), *rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(_COLUMNS))]
        left = {0, 1, 2, 4}  # text columns; numbers right-aligned
        for row in table:
            pairs = enumerate(zip(row, widths, strict=True))
            cells = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in pairs]
            lines.append("  " + "  ".join(cells).rstrip())
    lines += [f"  no results.json: {m} (the job failed or is still running)" for m in missing]
    lines.append(f"full report (Table 1, figures): python -m rift_bn.report {shlex.quote(str(sweep))}")
    return "\n".join(lines)


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml): when a multirun ends, print its jobs' table.

    It reads the jobs' ``results.json`` below the sweep folder, so it works whatever launcher ran the jobs
    (basic, joblib, submitit): ``on_multirun_end`` runs in the process that launched the sweep.
    """

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep = Path(str(config.hydra.sweep.dir))
        if not sweep.is_dir():
            return
        try:
            text = format_sweep(sweep.resolve())
        except Exception as exc:  # a summary must never turn a finished sweep into a failure
            text = f"sweep {sweep}: no summary ({type(exc).__name__}: {exc})"
        try:
            print("\n" + text, flush=True)
        except UnicodeEncodeError:  # a console that cannot show the delta sign
            print("\n" + text.replace("Δ", "d"), flush=True)
