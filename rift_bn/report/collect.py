"""Gather ``results.json`` files below run/sweep directories and describe each run for tables and figures."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "DATASET_LABELS",
    "METHOD_LABELS",
    "LAYER_TYPE_METHODS",
    "TOPK_METHODS",
    "Setting",
    "dataset_label",
    "estimator",
    "find_results",
    "load_runs",
    "setting",
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

Setting = tuple[str, str, Any]  # (dataset, model, width): runs are only compared within one setting


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


def _width(r: dict) -> Any:
    return r.get("width", ((r.get("config") or {}).get("model") or {}).get("width"))


def setting(r: dict) -> Setting:
    """``(dataset, model, width)``: the key inside which runs are comparable."""
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


def _complete(r: dict) -> str | None:
    """Why a results dict cannot be reported, or ``None``."""
    for key in ("stage", "dataset", "base", "final"):
        if key not in r:
            return f"missing key {key!r}"
    for part in ("base", "final"):
        if not isinstance(r[part], dict) or "clean_acc" not in r[part] or "robust_acc" not in r[part]:
            return f"{part} has no clean_acc/robust_acc"
    return None


def _identity(r: dict) -> tuple:
    return (
        *setting(r),
        r.get("stage"),
        r.get("method"),
        r.get("k"),
        estimator(r),
        r.get("seed"),
        r.get("job_key"),
    )


def load_runs(
    dirs: Iterable[str | os.PathLike[str]], exclude: Path | None = None, log: Callable[[str], None] = print
) -> list[dict]:
    """Read every complete ``results.json`` below ``dirs``; each dict gains ``_path`` (its absolute path).

    Unreadable or incomplete files are skipped with a printed reason. The same experiment found twice
    (same setting, method, k, estimator, seed and job key, e.g. a sweep rerun) is counted once: the newest.
    """
    runs: dict[tuple, dict] = {}
    for path in find_results(dirs, exclude):
        try:
            r = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log(f"skipped {path}: unreadable ({type(exc).__name__}: {exc})")
            continue
        why = _complete(r) if isinstance(r, dict) else "not a JSON object"
        if why:
            log(f"skipped {path}: {why}")
            continue
        r["_path"] = str(path)
        r["_mtime"] = path.stat().st_mtime
        key = _identity(r)
        if key in runs:
            old = runs[key]
            keep, drop = (r, old) if r["_mtime"] >= old["_mtime"] else (old, r)
            log(f"duplicate run: kept {keep['_path']}, ignored {drop['_path']}")
            runs[key] = keep
        else:
            runs[key] = r
    return list(runs.values())


def _group(r: dict) -> str:
    """The W&B group the run logged to (same rule as ``rift_bn.loggers.run_group``)."""
    cfg = (r.get("config") or {}).get("logger") or {}
    if cfg.get("group"):
        return str(cfg["group"])
    run_dir = Path(r["_path"]).parent
    if (run_dir.parent / "multirun.yaml").exists():
        return "sweep-" + "-".join(run_dir.parent.parts[-2:])
    return "run-" + "-".join(run_dir.parts[-2:])


def wandb_target(runs: list[dict]) -> dict[str, Any] | None:
    """``{project, entity, group, groups}`` of the runs logged to W&B (most common group), or ``None``."""
    logged = [r for r in runs if ((r.get("config") or {}).get("logger") or {}).get("name") == "wandb"]
    if not logged:
        return None
    groups = Counter(_group(r) for r in logged)
    projects = Counter(str(r["config"]["logger"].get("project") or "rift_bn") for r in logged)
    entity = next(
        (r["config"]["logger"].get("entity") for r in logged if r["config"]["logger"].get("entity")), None
    )
    return {
        "project": projects.most_common(1)[0][0],
        "entity": entity,
        "group": groups.most_common(1)[0][0],
        "groups": sorted(groups),
    }
