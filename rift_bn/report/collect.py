"""Gather ``results.json`` files below run/sweep directories and describe each run for tables and figures.

Runs are pooled over seeds only within one *experiment*: the same resolved config up to ``seed``, the
table's own rows (``method``, ``k``, ``stage``, ``finetune.bn_stats``, ``mrc.estimator``) and the settings
that change no number (:data:`NON_RESULT_KEYS`); a user-given ``base.checkpoint`` may differ only by the
seed in its path. ``finetune.bn_stats`` (which BN layers' running statistics adapt while fine-tuning) is a
row of Table 1, not an experiment: RiFT (``all`` by default) and RiFT with BN (``selected``) are compared in
one table, and a sweep over ``finetune.bn_stats`` gives one row per mode.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rift_bn.config import NON_RESULT_KEYS

__all__ = [
    "BN_STATS_TEXT",
    "DATASET_LABELS",
    "DEFAULT_BN_STATS",
    "LAYER_TYPE_METHODS",
    "METHOD_LABELS",
    "MISSING_REASON",
    "NON_RESULT_KEYS",
    "TOPK_METHODS",
    "Experiment",
    "Loaded",
    "Setting",
    "bn_stats",
    "bn_stats_label",
    "bn_stats_order",
    "check_one_experiment",
    "dataset_label",
    "dedupe",
    "estimator",
    "experiment_config",
    "experiment_key",
    "experiments",
    "find_missing",
    "find_results",
    "interpolation_alphas",
    "load",
    "load_runs",
    "row_estimator",
    "setting",
    "setting_label",
    "source_folder",
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
# The table's own rows (and the stage): runs differing only here (and in seed) are one experiment.
ROW_KEYS: tuple[str, ...] = (
    "seed",
    "k",
    "stage",
    "method.name",
    "method.kinds",
    "method.selection",
    "method.bn_stats",
    "finetune.bn_stats",
    "mrc.estimator",
)
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

Setting = tuple[str, str, Any]  # (dataset, model, width)


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


def _width(r: dict) -> Any:
    return r.get("width", ((r.get("config") or {}).get("model") or {}).get("width"))


def setting(r: dict) -> Setting:
    """``(dataset, model, width)``."""
    return (str(r.get("dataset")), str(r.get("model")), _width(r))


def setting_label(s: Setting) -> str:
    """``CIFAR-10, resnet18 (width 16)``."""
    dataset, model, width = s
    return f"{dataset_label(dataset)}, {model}" + (f" (width {width})" if width is not None else "")


def dataset_label(name: str) -> str:
    return DATASET_LABELS.get(name, name)


def estimator(r: dict) -> str:
    """The MRC estimator the run used (``exact`` unless the config or its MRC rows say otherwise)."""
    rows = r.get("mrc") or []
    if rows and rows[0].get("estimator"):
        return str(rows[0]["estimator"])
    return str(((r.get("config") or {}).get("mrc") or {}).get("estimator") or "exact")


def bn_stats(r: dict) -> str:
    """The fine-tuning run's ``finetune.bn_stats`` (``""`` for a base-model-only run).

    Read from the top-level ``bn_stats``, else from ``config.finetune.bn_stats``; runs written before either
    existed used ``selected`` for every method.
    """
    if r.get("stage") != "finetune":
        return ""
    if r.get("bn_stats"):
        return str(r["bn_stats"])
    cfg = (r.get("config") or {}).get("finetune") or {}
    return str(cfg.get("bn_stats") or "selected")


def bn_stats_order(method: str, mode: str) -> tuple[int, int, str]:
    """Sort key of a method's BN-statistics modes: its default first, then all, selected, none."""
    known = _BN_STATS_ORDER.index(mode) if mode in _BN_STATS_ORDER else len(_BN_STATS_ORDER)
    return (DEFAULT_BN_STATS.get(method) != mode, known, mode)


def bn_stats_label(mode: str) -> str:
    """`` (BN stats: none)``: the suffix of a row or line whose method has several modes (``""`` for none)."""
    return f" (BN stats: {mode})" if mode else ""


def row_estimator(r: dict) -> str:
    """The estimator as a table row key: only MRC-selected runs (``k`` set, or rift / rift_bn) have one."""
    if r.get("stage") == "finetune" and (r.get("k") is not None or r.get("method") in TOPK_METHODS):
        return estimator(r)
    return ""


def interpolation_alphas(r: dict) -> list[float]:
    """The run's ``interpolation.alphas`` (from its config, else from its interpolation curve)."""
    alphas = ((r.get("config") or {}).get("interpolation") or {}).get("alphas")
    if alphas is None:
        alphas = sorted({p["alpha"] for p in r.get("interpolation") or [] if "alpha" in p})
    return [float(a) for a in alphas]


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _dropped(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in (*NON_RESULT_KEYS, *ROW_KEYS))


def experiment_config(r: dict) -> dict[str, Any]:
    """The run's resolved config as ``{dotted key: value}`` without seed, row keys and non-result keys.

    A given ``base.checkpoint`` path has the run's seed replaced by ``{seed}``, so per-seed checkpoints
    (``base-0.pt``, ``base-1.pt``) belong to one experiment.
    """
    flat = {k: v for k, v in _flatten(r.get("config") or {}).items() if not _dropped(k)}
    flat.setdefault("data.name", r.get("dataset"))
    flat.setdefault("model.name", r.get("model"))
    flat.setdefault("model.width", _width(r))
    ckpt, seed = flat.get("base.checkpoint"), r.get("seed")
    if isinstance(ckpt, str) and seed is not None:
        flat["base.checkpoint"] = re.sub(rf"(?<![0-9]){int(seed)}(?![0-9])", "{seed}", ckpt)
    return flat


def experiment_key(r: dict) -> str:
    """Stable digest of :func:`experiment_config`: equal for runs that may be pooled over seeds."""
    text = json.dumps(experiment_config(r), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _keys(runs: Sequence[dict]) -> list[str]:
    """Experiment key per run; a base-only (``stage=at``) run joins the fine-tuned runs sharing its base."""
    keys = [experiment_key(r) for r in runs]
    by_ckpt: dict[str, set[str]] = {}
    for r, key in zip(runs, keys, strict=True):
        if r.get("stage") == "finetune" and (r.get("base") or {}).get("checkpoint"):
            by_ckpt.setdefault(str(r["base"]["checkpoint"]), set()).add(key)
    for i, r in enumerate(runs):
        found = by_ckpt.get(str((r.get("base") or {}).get("checkpoint")), set())
        if r.get("stage") != "finetune" and len(found) == 1:
            keys[i] = next(iter(found))
    return keys


def source_folder(r: dict) -> Path:
    """The sweep folder of a run (the parent holding ``multirun.yaml``), else its own job folder."""
    job = Path(r["_path"]).parent
    return job.parent if (job.parent / "multirun.yaml").exists() else job


def _show(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


@dataclass
class Experiment:
    """Runs that are the same experiment up to the seed (see the module docstring)."""

    key: str
    setting: Setting
    runs: list[dict]
    tag: str = ""  # file-name tag: setting_tag, + ``_expN`` when the setting has several experiments
    setting_tag: str = ""  # the dataset, + ``_<model>_w<width>`` when the dataset has several settings
    label: str = ""  # what sets it apart from the other experiments of its setting ("" when alone)
    config: dict[str, Any] = field(default_factory=dict)  # experiment_config of a fine-tuned run
    choices: dict[str, str] = field(default_factory=dict)  # Hydra group choices (scale, experiment, ...)

    @property
    def title(self) -> str:
        """``CIFAR-10, resnet18 (width 16)``, plus `` · label`` when the setting has several experiments."""
        return setting_label(self.setting) + (f" · {self.label}" if self.label else "")

    @property
    def seeds(self) -> list[int]:
        return sorted({int(r["seed"]) for r in self.runs if r.get("seed") is not None})

    @property
    def folders(self) -> list[str]:
        return sorted({_show(source_folder(r)) for r in self.runs if r.get("_path")})


def _short(v: Any, n: int = 40) -> str:
    text = json.dumps(v, default=str) if not isinstance(v, str) else v
    return text if len(text) <= n else text[: n - 1] + "…"


def _differences(exps: Sequence[Experiment]) -> list[tuple[str, str]]:
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


def _label(e: Experiment, diff: Sequence[tuple[str, str]], most: int = 4) -> str:
    """``scale=cpu, interpolation.alphas=[1.0]``: this experiment's values of the differing settings."""
    items = [
        f"{name}={e.choices.get(name, 'null')}" if src == "choice" else f"{name}={_short(e.config.get(name))}"
        for src, name in diff
    ]
    return ", ".join(items[:most]) + (f", +{len(items) - most} more" if len(items) > most else "")


def experiments(runs: Sequence[dict]) -> list[Experiment]:
    """The runs grouped into experiments, with tags and distinguishing labels.

    Experiments are ordered (and numbered, ``_exp1``, ``_exp2``) by the path of their first
    ``results.json``, then in first-seen order: the same runs get the same tags whatever order their
    folders were given in (``python -m rift_bn.report A B``, ``... B A``, their parent, the notebook).
    """
    found: dict[str, Experiment] = {}
    for r, key in zip(runs, _keys(runs), strict=True):
        e = found.setdefault(key, Experiment(key, setting(r), []))
        e.runs.append(r)
    out = sorted(found.values(), key=lambda e: min(str(r.get("_path") or "") for r in e.runs))
    for e in out:
        rep = next((r for r in e.runs if r.get("stage") == "finetune"), e.runs[0])
        e.config = experiment_config(rep)
        e.choices = next((dict(r["_choices"]) for r in [rep, *e.runs] if r.get("_choices")), {})
    by_setting: dict[Setting, list[Experiment]] = {}
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


def check_one_experiment(runs: Sequence[dict], what: str) -> None:
    """Raise ``ValueError`` when ``runs`` are several experiments (they must not be averaged together)."""
    exps = experiments(runs)
    if len(exps) > 1:
        diff = [name for _, name in _differences(exps)]
        shown = ", ".join(diff[:6]) + (f" (+{len(diff) - 6} more)" if len(diff) > 6 else "")
        raise ValueError(
            f"{what}: the runs are {len(exps)} different experiments (they differ in {shown}); pass one "
            "experiment's runs (rift_bn.report.collect.experiments) or one sweep at a time"
        )


def _complete(r: dict) -> str | None:
    """Why a results dict cannot be reported, or ``None``."""
    for key in ("stage", "dataset", "base", "final"):
        if key not in r:
            return f"missing key {key!r}"
    for part in ("base", "final"):
        if not isinstance(r[part], dict) or "clean_acc" not in r[part] or "robust_acc" not in r[part]:
            return f"{part} has no clean_acc/robust_acc"
    return None


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


def dedupe(runs: Sequence[dict]) -> tuple[list[dict], list[str]]:
    """One run per job (experiment, stage, method, k, estimator, bn_stats, seed): the newest ``results.json``.

    Returns the kept runs (in first-seen order) and one note per job found more than once.
    """
    copies: dict[tuple, list[dict]] = {}
    for r, key in zip(runs, _keys(runs), strict=True):
        method = (r.get("config") or {}).get("method") or {}
        job = (key, r.get("stage"), r.get("method"), r.get("k"), row_estimator(r), bn_stats(r), r.get("seed"))
        job += (json.dumps([method.get("kinds"), method.get("selection")], default=str),)
        copies.setdefault(job, []).append(r)
    kept: list[dict] = []
    notes: list[str] = []
    for rs in copies.values():
        newest = max(rs, key=lambda r: r.get("_mtime", 0))  # the first of equally new copies
        kept.append(newest)
        if len(rs) > 1:
            ignored = ", ".join(_show(Path(r["_path"])) for r in rs if r is not newest)
            notes.append(
                f"duplicate job ({len(rs)} copies of one config, seed {newest.get('seed')}): kept the newest "
                f"{_show(Path(newest['_path']))}; ignored {ignored}"
            )
    return kept, notes


@dataclass
class Loaded:
    """What :func:`load` found: the runs, job folders without results, and one note per irregularity."""

    runs: list[dict]
    missing: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def load(dirs: Iterable[str | os.PathLike[str]], exclude: Path | None = None) -> Loaded:
    """Read every complete ``results.json`` below ``dirs`` and list the job folders that have none.

    Each run dict gains ``_path``, ``_mtime`` and ``_choices`` (its Hydra group choices). Unreadable or
    incomplete files, duplicate jobs (the newest is kept) and missing results become notes.
    """
    dirs = list(dirs)
    runs: list[dict] = []
    notes: list[str] = []
    for path in find_results(dirs, exclude):
        try:
            r = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            notes.append(f"skipped {_show(path)}: unreadable ({type(exc).__name__}: {exc})")
            continue
        why = _complete(r) if isinstance(r, dict) else "not a JSON object"
        if why:
            notes.append(f"skipped {_show(path)}: {why}")
            continue
        r |= {"_path": str(path), "_mtime": path.stat().st_mtime, "_choices": _choices(path.parent)}
        runs.append(r)
    runs, dup_notes = dedupe(runs)
    missing = find_missing(dirs, exclude)
    notes += dup_notes + [f"missing: {_show(m)} ({MISSING_REASON})" for m in missing]
    return Loaded(runs, missing, notes)


def load_runs(
    dirs: Iterable[str | os.PathLike[str]], exclude: Path | None = None, log: Callable[[str], None] = print
) -> list[dict]:
    """The runs of :func:`load`; its notes (skipped files, duplicates, missing results) go to ``log``."""
    loaded = load(dirs, exclude)
    for note in loaded.notes:
        log(note)
    return loaded.runs


def _group(r: dict) -> str:
    """The W&B group the run logged to (same rule as ``rift_bn.loggers.run_group``)."""
    cfg = (r.get("config") or {}).get("logger") or {}
    if cfg.get("group"):
        return str(cfg["group"])
    run_dir = Path(r["_path"]).parent
    if (run_dir.parent / "multirun.yaml").exists():
        return "sweep-" + "-".join(run_dir.parent.parts[-2:])
    return "run-" + "-".join(run_dir.parts[-2:])


def _below(r: dict, folder: Path) -> bool:
    path = r.get("_path")
    return bool(path) and (folder == Path(path).resolve() or folder in Path(path).resolve().parents)


def wandb_target(runs: list[dict], first: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """``{project, entity, group, groups}`` of the runs logged to W&B, or ``None``. The group is that of the
    runs below ``first`` (the report's first folder, where it is written), else the most common one."""
    logged = [r for r in runs if ((r.get("config") or {}).get("logger") or {}).get("name") == "wandb"]
    if not logged:
        return None
    groups = Counter(_group(r) for r in logged)
    mine: Counter[str] = Counter()
    if first is not None:
        folder = Path(first).resolve()
        mine = Counter(_group(r) for r in logged if _below(r, folder))
    projects = Counter(str(r["config"]["logger"].get("project") or "rift_bn") for r in logged)
    entity = next(
        (r["config"]["logger"].get("entity") for r in logged if r["config"]["logger"].get("entity")), None
    )
    return {
        "project": projects.most_common(1)[0][0],
        "entity": entity,
        "group": (mine or groups).most_common(1)[0][0],
        "groups": sorted(groups),
    }
