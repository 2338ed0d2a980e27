"""Gather ``results.json`` files below run/sweep directories as typed records (:mod:`rift_bn.results`).

Runs are pooled over seeds only within one *experiment*: the ``experiment.group`` each run stored
(:func:`rift_bn.results.experiment_key`: the same resolved config up to the seed, the table's own rows and
the settings that change no number; files written before it have it computed when they load). A base-only
run (``stage=at``) is shown with the fine-tuned runs of its base checkpoint. ``finetune.bn_stats`` (which BN
layers' running statistics adapt while fine-tuning) is a row of Table 1, not an experiment: RiFT (``all``
by default) and RiFT with BN (``selected``) are compared in one table, and a sweep over
``finetune.bn_stats`` gives one row per mode.

A run that wrote ``outcomes.npz`` (which test images the base and the final model get right) brings it
along (:attr:`Run.outcomes`) for the paired statistics; older runs have none.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rift_bn.results import Experiment, Results, ResultsError, experiment_config, read_outcomes
from rift_bn.results import load as load_results
from rift_bn.stats import percent

__all__ = [
    "BN_STATS_TEXT",
    "DATASET_LABELS",
    "DEFAULT_BN_STATS",
    "LAYER_TYPE_METHODS",
    "METHOD_LABELS",
    "MISSING_REASON",
    "OUTCOME_ARRAYS",
    "TOPK_METHODS",
    "ExperimentRuns",
    "Loaded",
    "Run",
    "Setting",
    "attack_text",
    "bn_stats_label",
    "bn_stats_order",
    "check_one_experiment",
    "dataset_label",
    "dedupe",
    "experiments",
    "find_missing",
    "find_results",
    "load",
    "load_runs",
    "read_run",
    "setting_label",
    "wandb_target",
]

TOPK_METHODS: tuple[str, ...] = ("rift", "rift_bn")
LAYER_TYPE_METHODS: tuple[str, ...] = ("bn_only", "conv_linear_only", "full")
METHOD_LABELS: dict[str, str] = {
    "base": "Base (AT)",
    "rift": "RiFT",
    "rift_bn": "RiFT with BN",
    "bn_only": "BN only",
    "conv_linear_only": "Conv/Linear only",
    "full": "Full",
}
DATASET_LABELS: dict[str, str] = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
# finetune.bn_stats: what each mode means, and each method's default (rift = the original RiFT code).
BN_STATS_TEXT: dict[str, str] = {
    "all": "every BN layer's running statistics adapt (finetune.bn_stats=all, as the original RiFT code)",
    "selected": "only the selected BN layers' running statistics adapt (finetune.bn_stats=selected)",
    "none": "no BN layer's running statistics adapt (finetune.bn_stats=none)",
}
DEFAULT_BN_STATS: dict[str, str] = {"rift": "all", "rift_bn": "selected"}
_BN_STATS_ORDER = ("all", "selected", "none")
MISSING_REASON = "no results.json; the job failed or is still running"
_HIDDEN_CHOICES = ("method", "logger")  # Hydra group choices that never tell experiments apart
# outcomes.npz: the arrays the report reads (AutoAttack's, when present, are not used)
OUTCOME_ARRAYS: tuple[str, ...] = ("test_index", "base_clean", "base_robust", "final_clean", "final_robust")

Setting = tuple[str, str, Any]  # (dataset, model, width)


@dataclass(frozen=True)
class Run:
    """One run as the report reads it: its record, its ``results.json``, that file's time, Hydra's group
    choices of its job (scale, experiment, ...) and its per-image test outcomes (None without them)."""

    results: Results
    path: Path
    mtime: float = 0.0
    choices: Mapping[str, str] = field(default_factory=dict)
    outcomes: Mapping[str, np.ndarray] | None = None

    @property
    def experiment(self) -> Experiment:
        return self.results.experiment

    @property
    def seed(self) -> int:
        return self.experiment.seed

    @property
    def method(self) -> str | None:
        """The fine-tuning method (None for a base-only run)."""
        return self.experiment.method if self.experiment.stage == "finetune" else None

    @property
    def k(self) -> int | None:
        return self.experiment.k

    @property
    def bn_stats(self) -> str:
        """``finetune.bn_stats`` (``""`` for a base-only run)."""
        return (self.experiment.bn_stats or "") if self.method else ""

    @property
    def setting(self) -> Setting:
        """``(dataset, model, width)``."""
        return (self.experiment.dataset, self.experiment.model, self.experiment.width)

    @property
    def estimator(self) -> str:
        """The MRC estimator the run used (``exact`` unless its MRC rows or its config say otherwise)."""
        rows = self.results.mrc
        if rows and rows[0].get("estimator"):
            return str(rows[0]["estimator"])
        return str((self.results.config.get("mrc") or {}).get("estimator") or "exact")

    @property
    def row_estimator(self) -> str:
        """The estimator as a table row key: only MRC-selected runs (``k`` set, rift, rift_bn) have one."""
        return self.estimator if self.k is not None or self.method in TOPK_METHODS else ""

    @property
    def interpolation_alphas(self) -> list[float]:
        """The run's ``interpolation.alphas`` (from its config, else from its interpolation curve)."""
        alphas = (self.results.config.get("interpolation") or {}).get("alphas")
        if alphas is None:
            alphas = sorted({p["alpha"] for p in self.results.interpolation})
        return [float(a) for a in alphas]

    @property
    def test_index(self) -> np.ndarray:
        """The test images the run was scored on (positions in the test set), from its outcomes."""
        return self._outcome("test_index")

    def correct(self, model: str, metric: str) -> np.ndarray:
        """Per test image, whether ``model`` (``base`` or ``final``) got it right under ``metric``
        (``clean`` or ``robust``)."""
        return self._outcome(f"{model}_{metric}")

    def _outcome(self, key: str) -> np.ndarray:
        if self.outcomes is None:
            raise ValueError(f"{self.path}: no per-image outcomes (outcomes.npz)")
        return self.outcomes[key]

    def beside(self, name: str) -> Path:
        """A file the run wrote beside its ``results.json`` (a record's relative file name)."""
        return self.path.parent / name


def find_results(dirs: Iterable[str | os.PathLike[str]], exclude: Path | None = None) -> list[Path]:
    """Every ``results.json`` at or below ``dirs`` (a file is taken as it is), sorted, without repeats."""
    found: dict[Path, None] = {}
    for d in dirs:
        p = Path(d)
        if p.is_file():
            found[p.resolve()] = None
            continue
        if not p.is_dir():
            raise FileNotFoundError(f"{p}: no such run or sweep directory")
        for f in sorted(p.rglob("results.json")):
            f = f.resolve()
            if exclude is not None and exclude.resolve() in f.parents:
                continue
            found[f] = None
    return list(found)


def find_missing(dirs: Iterable[str | os.PathLike[str]], exclude: Path | None = None) -> list[Path]:
    """Hydra job folders (they hold ``.hydra/``) at or below ``dirs`` without a ``results.json``, sorted."""
    found: dict[Path, None] = {}
    for d in dirs:
        p = Path(d)
        if not p.is_dir():
            continue
        for h in sorted(p.rglob(".hydra")):
            job = h.parent.resolve()
            if not h.is_dir() or (job / "results.json").exists():
                continue
            if exclude is not None and (exclude.resolve() == job or exclude.resolve() in job.parents):
                continue
            found[job] = None
    return list(found)


def setting_label(s: Setting) -> str:
    """``CIFAR-10, resnet18 (width 16)``."""
    dataset, model, width = s
    return f"{dataset_label(dataset)}, {model}" + (f" (width {width})" if width is not None else "")


def dataset_label(name: str) -> str:
    return DATASET_LABELS.get(name, name)


def bn_stats_order(method: str, mode: str) -> tuple[int, int, str]:
    """Sort key of a method's BN-statistics modes: its default first, then all, selected, none."""
    known = _BN_STATS_ORDER.index(mode) if mode in _BN_STATS_ORDER else len(_BN_STATS_ORDER)
    return (DEFAULT_BN_STATS.get(method) != mode, known, mode)


def bn_stats_label(mode: str) -> str:
    """`` (BN stats: none)``: the suffix of a row or line whose method has several modes (``""`` for none)."""
    return f" (BN stats: {mode})" if mode else ""


def _groups(runs: Sequence[Run]) -> list[str]:
    """The stored experiment group per run; a base-only (``stage=at``) run joins the one group of the
    fine-tuned runs sharing its base checkpoint."""
    groups = [r.experiment.group for r in runs]
    by_ckpt: dict[str, set[str]] = {}
    for r in runs:
        if r.method:
            by_ckpt.setdefault(r.results.base["checkpoint"], set()).add(r.experiment.group)
    for i, r in enumerate(runs):
        found = by_ckpt.get(r.results.base["checkpoint"], set())
        if not r.method and len(found) == 1:
            groups[i] = next(iter(found))
    return groups


def source_folder(r: Run) -> Path:
    """The sweep folder of a run (the parent holding ``multirun.yaml``), else its own job folder."""
    job = r.path.parent
    return job.parent if (job.parent / "multirun.yaml").exists() else job


def _show(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


@dataclass
class ExperimentRuns:
    """The runs of one experiment (see the module docstring) and how the report names it."""

    key: str  # the experiment group
    setting: Setting
    runs: list[Run]
    tag: str = ""  # file-name tag: setting_tag, + ``_expN`` when the setting has several experiments
    setting_tag: str = ""  # the dataset, + ``_<model>_w<width>`` when the dataset has several settings
    label: str = ""  # what sets it apart from the other experiments of its setting ("" when alone)
    config: dict[str, Any] = field(default_factory=dict)  # experiment_config of a fine-tuned run
    choices: Mapping[str, str] = field(default_factory=dict)  # Hydra group choices (scale, experiment, ...)

    @property
    def title(self) -> str:
        """``CIFAR-10, resnet18 (width 16)``, plus `` · label`` when the setting has several experiments."""
        return setting_label(self.setting) + (f" · {self.label}" if self.label else "")

    @property
    def seeds(self) -> list[int]:
        return sorted({r.seed for r in self.runs})

    @property
    def folders(self) -> list[str]:
        return sorted({_show(source_folder(r)) for r in self.runs})


def _short(v: Any, n: int = 40) -> str:
    text = json.dumps(v, default=str) if not isinstance(v, str) else v
    return text if len(text) <= n else text[: n - 1] + "…"


def _differences(exps: Sequence[ExperimentRuns]) -> list[tuple[str, str]]:
    """``("choice", group)`` for Hydra choices and ``("config", key)`` for config keys whose values differ
    between ``exps``; a config key that is a function of the choices (e.g. set by ``scale=cpu``) is left out.
    """
    groups = sorted({g for e in exps for g in e.choices})
    choice_of = lambda e: tuple(e.choices.get(g, "null") for g in groups)
    diff = [("choice", g) for g in groups if len({e.choices.get(g, "null") for e in exps}) > 1]
    value = lambda e, k: json.dumps(e.config.get(k), sort_keys=True, default=str)
    for k in sorted({k for e in exps for k in e.config}):
        if len({value(e, k) for e in exps}) < 2:
            continue
        by_choice: dict[tuple, str] = {}
        if any(by_choice.setdefault(choice_of(e), value(e, k)) != value(e, k) for e in exps):
            diff.append(("config", k))
    return diff


def _label(e: ExperimentRuns, diff: Sequence[tuple[str, str]], most: int = 4) -> str:
    """``scale=cpu, interpolation.alphas=[1.0]``: this experiment's values of the differing settings."""
    items = [
        f"{name}={e.choices.get(name, 'null')}" if src == "choice" else f"{name}={_short(e.config.get(name))}"
        for src, name in diff
    ]
    return ", ".join(items[:most]) + (f", +{len(items) - most} more" if len(items) > most else "")


def experiments(runs: Sequence[Run]) -> list[ExperimentRuns]:
    """The runs grouped into experiments, with tags and distinguishing labels.

    Experiments are ordered (and numbered, ``_exp1``, ``_exp2``) by the path of their first
    ``results.json``, then in first-seen order: the same runs get the same tags whatever order their
    folders were given in (``python -m rift_bn.report A B``, ``... B A``, their parent, the notebook).
    """
    found: dict[str, ExperimentRuns] = {}
    for r, key in zip(runs, _groups(runs), strict=True):
        found.setdefault(key, ExperimentRuns(key, r.setting, [])).runs.append(r)
    out = sorted(found.values(), key=lambda e: min(str(r.path) for r in e.runs))
    for e in out:
        rep = next((r for r in e.runs if r.method), e.runs[0])
        e.config = experiment_config(rep.results.to_dict())
        e.choices = next((dict(r.choices) for r in [rep, *e.runs] if r.choices), {})
    by_setting: dict[Setting, list[ExperimentRuns]] = {}
    for e in out:
        by_setting.setdefault(e.setting, []).append(e)
    for s, group in by_setting.items():
        same_dataset = sum(1 for t in by_setting if t[0] == s[0])
        tag = s[0] if same_dataset == 1 else f"{s[0]}_{s[1]}_w{s[2]}"
        diff = _differences(group) if len(group) > 1 else []
        for i, e in enumerate(group, 1):
            e.setting_tag = tag
            e.tag = tag if len(group) == 1 else f"{tag}_exp{i}"
            e.label = (_label(e, diff) or f"experiment {i}") if len(group) > 1 else ""
    return out


def check_one_experiment(runs: Sequence[Run], what: str) -> None:
    """Raise ``ValueError`` when ``runs`` are several experiments (they must not be averaged together)."""
    exps = experiments(runs)
    if len(exps) > 1:
        diff = [name for _, name in _differences(exps)]
        shown = ", ".join(diff[:6]) + (f" (+{len(diff) - 6} more)" if len(diff) > 6 else "")
        raise ValueError(
            f"{what}: the runs are {len(exps)} different experiments (they differ in {shown}); pass one "
            "experiment's runs (rift_bn.report.collect.experiments) or one sweep at a time"
        )


def _choices(job: Path) -> dict[str, str]:
    """Hydra's group choices of a job (``.hydra/hydra.yaml``), without hydra/* and method/logger."""
    path = job / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        choices = ((yaml.safe_load(path.read_text()) or {}).get("hydra") or {}).get("runtime", {})["choices"]
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return {}
    return {
        str(g): str(v)
        for g, v in (choices or {}).items()
        if not str(g).startswith("hydra/") and g not in _HIDDEN_CHOICES
    }


def _outcomes(results: Results, path: Path) -> tuple[dict[str, np.ndarray] | None, str]:
    """The run's per-image test outcomes (``results.outcomes`` beside ``path``), or None and why not
    (``""`` for a run that wrote none)."""
    if results.outcomes is None:
        return None, ""
    file = path.parent / results.outcomes
    try:
        arrays = read_outcomes(file)
    except (OSError, ValueError) as exc:
        return None, f"{_show(file)}: unreadable ({type(exc).__name__}: {exc})"
    missing = [k for k in OUTCOME_ARRAYS if k not in arrays]
    n = {len(arrays[k]) for k in OUTCOME_ARRAYS if k in arrays}
    if missing or len(n) > 1 or any(arrays[k].dtype != np.bool_ for k in OUTCOME_ARRAYS[1:]):
        return None, f"{_show(file)}: not an outcomes file (missing {missing} or uneven arrays)"
    for who, acc in (("base", results.base), ("final", results.final)):
        for metric in ("clean", "robust"):
            if not math.isclose(percent(arrays[f"{who}_{metric}"]), acc[f"{metric}_acc"], abs_tol=1e-3):
                return None, f"{_show(file)}: {who}_{metric} disagrees with results.json (a stale copy?)"
    return arrays, ""


def read_run(path: Path) -> tuple[Run, list[str]]:
    """The run of a ``results.json`` (:class:`rift_bn.results.ResultsError` when it is not one) and notes
    on its outcomes (when they cannot be used, the run is reported without its paired statistics)."""
    results = load_results(path)
    outcomes, why = _outcomes(results, path)
    notes = [f"no paired statistics for {_show(path)}: {why}"] if why else []
    return Run(results, path, path.stat().st_mtime, _choices(path.parent), outcomes), notes


def dedupe(runs: Sequence[Run]) -> tuple[list[Run], list[str]]:
    """One run per job (experiment, stage, method, k, estimator, bn_stats, seed): the newest ``results.json``.

    Returns the kept runs (in first-seen order) and one note per job found more than once.
    """
    copies: dict[tuple, list[Run]] = {}
    for r, key in zip(runs, _groups(runs), strict=True):
        method = r.results.config.get("method") or {}
        job = (key, r.experiment.stage, r.method, r.k, r.row_estimator, r.bn_stats, r.seed)
        job += (json.dumps([method.get("kinds"), method.get("selection")], default=str),)
        copies.setdefault(job, []).append(r)
    kept: list[Run] = []
    notes: list[str] = []
    for rs in copies.values():
        newest = max(rs, key=lambda r: r.mtime)  # the first of equally new copies
        kept.append(newest)
        if len(rs) > 1:
            ignored = ", ".join(_show(r.path) for r in rs if r is not newest)
            notes.append(
                f"duplicate job ({len(rs)} copies of one config, seed {newest.seed}): kept the newest "
                f"{_show(newest.path)}; ignored {ignored}"
            )
    return kept, notes


@dataclass
class Loaded:
    """What :func:`load` found: the runs, job folders without results, and one note per irregularity."""

    runs: list[Run]
    missing: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def load(dirs: Iterable[str | os.PathLike[str]], exclude: Path | None = None) -> Loaded:
    """Read every complete ``results.json`` below ``dirs`` and list the job folders that have none.

    Files that are not a finished run's record (unreadable, unfinished, written by another version),
    outcomes that cannot be used, duplicate jobs (the newest is kept) and missing results become notes.
    """
    dirs = list(dirs)
    runs: list[Run] = []
    notes: list[str] = []
    for path in find_results(dirs, exclude):
        try:
            run, run_notes = read_run(path)
        except ResultsError as exc:
            notes.append(f"skipped {exc}")
            continue
        runs.append(run)
        notes += run_notes
    runs, dup_notes = dedupe(runs)
    missing = find_missing(dirs, exclude)
    notes += dup_notes + [f"missing: {_show(m)} ({MISSING_REASON})" for m in missing]
    return Loaded(runs, missing, notes)


def load_runs(
    dirs: Iterable[str | os.PathLike[str]], exclude: Path | None = None, log: Callable[[str], None] = print
) -> list[Run]:
    """The runs of :func:`load`; its notes (skipped files, duplicates, missing results) go to ``log``."""
    loaded = load(dirs, exclude)
    for note in loaded.notes:
        log(note)
    return loaded.runs


def _logger(r: Run) -> dict[str, Any]:
    return r.results.config.get("logger") or {}


def _wandb_group(r: Run) -> str:
    """The W&B group the run logged to (same rule as ``rift_bn.loggers.run_group``)."""
    if _logger(r).get("group"):
        return str(_logger(r)["group"])
    run_dir = r.path.parent
    if (run_dir.parent / "multirun.yaml").exists():
        return "sweep-" + "-".join(run_dir.parent.parts[-2:])
    return "run-" + "-".join(run_dir.parts[-2:])


def _below(r: Run, folder: Path) -> bool:
    return folder == r.path.resolve() or folder in r.path.resolve().parents


def wandb_target(runs: Sequence[Run], first: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """``{project, entity, group, groups}`` of the runs logged to W&B, or ``None``. The group is that of the
    runs below ``first`` (the report's first folder, where it is written), else the most common one."""
    logged = [r for r in runs if _logger(r).get("name") == "wandb"]
    if not logged:
        return None
    groups = Counter(_wandb_group(r) for r in logged)
    mine: Counter[str] = Counter()
    if first is not None:
        folder = Path(first).resolve()
        mine = Counter(_wandb_group(r) for r in logged if _below(r, folder))
    projects = Counter(str(_logger(r).get("project") or "rift_bn") for r in logged)
    entity = next((_logger(r)["entity"] for r in logged if _logger(r).get("entity")), None)
    return {
        "project": projects.most_common(1)[0][0],
        "entity": entity,
        "group": (mine or groups).most_common(1)[0][0],
        "groups": sorted(groups),
    }


# The paper's PGD-10: fills what an old run's config.attack does not say.
DEFAULT_ATTACK: dict[str, Any] = {
    "eps": "8/255",
    "alpha": "2/255",
    "steps": 10,
    "random_start": True,
    "restarts": 1,
}


def _px(v: Any) -> str:
    """A pixel-scale value as the config wrote it (``8/255``), a float as ``k/255`` when it is one."""
    if isinstance(v, str):
        return v
    v = float(v)
    return f"{round(v * 255):g}/255" if math.isclose(v * 255, round(v * 255), abs_tol=1e-6) else f"{v:g}"


def attack_text(r: Run) -> str:
    """The run's evaluation attack (``config.attack``), e.g. ``PGD-10 (eps 8/255, step 2/255, random start)``,
    with restarts when more than one."""
    given = r.results.config.get("attack") or {}
    a = DEFAULT_ATTACK | {k: v for k, v in given.items() if v is not None}
    extra = [f"eps {_px(a['eps'])}", f"step {_px(a['alpha'])}"]
    extra += ["random start"] if a["random_start"] else ["no random start"]
    extra += [f"worst of {a['restarts']} restarts"] if int(a["restarts"]) > 1 else []
    return f"PGD-{a['steps']} ({', '.join(extra)})"
