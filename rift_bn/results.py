"""The record of one run, ``results.json``: typed and versioned, written once per run (beside Hydra's output
and in the cache's ``runs/<job key>/``) and read by the console summary, the loggers and the report.

Version 2 adds ``schema_version`` and ``experiment``, the run's identity stored at run time, to the keys of
version 1 (files without ``schema_version``). The identity's fields stay at the top level of the file too,
as version 1 had them, for readers of plain JSON. A version-1 file loads as version 2; a file of another
version, or one without the test numbers, is refused with one line (:class:`ResultsError`).

A new optional field is one more dataclass field with a default: older files load without it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import numpy as np

from rift_bn import cache
from rift_bn.config import NON_RESULT_KEYS, unused_corruption_keys
from rift_bn.errors import UserError

SCHEMA_VERSION = 2
# The identity's fields as version 1 kept them, at the top level (still written for plain-JSON readers).
IDENTITY_KEYS = ("stage", "dataset", "model", "width", "method", "k", "bn_stats", "seed")
# Settings that are rows of one table (and the seed): runs differing only here are one experiment.
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


class ResultsError(UserError):
    """A ``results.json`` that cannot be read as a run's record."""


class Accuracy(TypedDict):
    """Test accuracy (percent) of one model, and the checkpoint it was measured on."""

    clean_acc: float
    robust_acc: float
    autoattack_acc: NotRequired[float]  # eval.autoattack=true
    checkpoint: str


class CurvePoint(TypedDict):
    """Selection-split accuracy (percent) of theta(alpha)."""

    alpha: float
    clean_acc: float
    robust_acc: float


class Corruptions(TypedDict):
    """Accuracy (percent) on the common corruptions (``eval.corruptions``): ``base`` / ``final`` map each
    metric (``clean_acc``; ``robust_acc`` with ``eval.corruptions_attack``) to ``{corruption: {severity:
    acc}}`` (severities ``"1"`` to ``"5"``, JSON keys), each over ``images`` corrupted test images; ``mean``
    holds per model (and ``delta`` = final - base) each metric's mean over every corruption and severity,
    RiFT's summary number."""

    images: int
    base: dict[str, dict[str, dict[str, float]]]
    final: dict[str, dict[str, dict[str, float]]]
    mean: dict[str, dict[str, float]]


class Selected(TypedDict):
    """A fine-tuned module: its name in the network, kind, and MRC (None for the layer-type methods)."""

    name: str
    type: str
    mrc: float | None


@dataclass(frozen=True)
class Experiment:
    """Which experiment a run belongs to, and its place there: the row (stage, method, k, bn_stats) and seed.

    ``group`` is equal for the runs the report pools over seeds into one table: the same resolved config
    up to the table's rows, the seed and the settings that change no number (:func:`experiment_key`).
    ``name`` is the ``+experiment=<name>`` the run was started with (None without one, and for version-1
    files)."""

    group: str
    name: str | None
    stage: str
    dataset: str
    model: str
    width: int | None
    method: str | None
    k: int | None
    bn_stats: str | None
    seed: int

    @classmethod
    def of_run(cls, config: dict[str, Any], name: str | None) -> Experiment:
        """The identity of a run of the resolved ``config``, started as ``+experiment=<name>``."""
        finetuned = config["stage"] == "finetune"
        identity = {
            "stage": config["stage"],
            "dataset": config["data"]["name"],
            "model": config["model"]["name"],
            "width": config["model"]["width"],
            "method": config["method"]["name"] if finetuned else None,
            "k": config["k"] if finetuned and config["method"]["selection"] == "mrc" else None,
            "bn_stats": config["finetune"]["bn_stats"] if finetuned else None,
            "seed": config["seed"],
        }
        return cls(group=_group(identity, config), name=name, **identity)


def _group(identity: dict[str, Any], config: dict[str, Any]) -> str:
    return experiment_key({**identity, "config": config})


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _dropped(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in (*NON_RESULT_KEYS, *ROW_KEYS))


def experiment_config(record: dict[str, Any]) -> dict[str, Any]:
    """A record's resolved config (``record["config"]``, the identity at the top level, as in the file) as
    ``{dotted key: value}`` without the seed, the :data:`ROW_KEYS`, ``config.NON_RESULT_KEYS`` and, without
    the corruption evaluation, its settings (``config.unused_corruption_keys``).

    A given ``base.checkpoint`` path has the run's seed replaced by ``{seed}``, so per-seed checkpoints
    (``base-0.pt``, ``base-1.pt``) belong to one experiment.
    """
    config = record.get("config") or {}
    unused = unused_corruption_keys(config)  # eval.corruptions=false: as before the setting existed
    flat = {k: v for k, v in _flatten(config).items() if not _dropped(k) and k not in unused}
    flat.setdefault("data.name", record.get("dataset"))
    flat.setdefault("model.name", record.get("model"))
    flat.setdefault("model.width", record.get("width"))
    ckpt, seed = flat.get("base.checkpoint"), record.get("seed")
    if isinstance(ckpt, str) and seed is not None:
        flat["base.checkpoint"] = re.sub(rf"(?<![0-9]){int(seed)}(?![0-9])", "{seed}", ckpt)
    return flat


def experiment_key(record: dict[str, Any]) -> str:
    """Stable digest of :func:`experiment_config`: the :class:`Experiment` ``group``."""
    text = json.dumps(experiment_config(record), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Results:
    """One run's record; see the module docstring for the file. Only the identity and the test numbers are
    required: the other fields have the defaults of a run that did not reach them (older files)."""

    experiment: Experiment
    base: Accuracy  # test split, base model
    final: Accuracy  # test split, theta(alpha*) (the base model itself for stage=at)
    data_fingerprint: str | None = None  # the images and labels the run loaded
    selection_source: str | None = None  # data.selection_source
    selection_held_out: bool | None = None  # False: a given checkpoint may have trained on the split
    selection_size: int | None = None
    test_size: int | None = None
    selected: list[Selected] = field(default_factory=list)
    mrc: list[dict[str, Any]] = field(default_factory=list)  # MRC rows of every candidate (rift_bn.mrc)
    mrc_source: str | None = None  # computed | cache
    alpha: float | None = None  # alpha*
    interpolation: list[CurvePoint] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)  # fine-tuning's validation per epoch
    base_training: dict[str, Any] = field(default_factory=dict)  # the base model's training record
    finetuned_checkpoint: str | None = None  # theta(1)
    selection_split: dict[str, dict[str, float]] | None = None  # base and theta(alpha*) on the split
    delta: dict[str, float] = field(default_factory=dict)  # final - base, per accuracy
    test_split_reads_before_report: int = 0
    resumed: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # per stage trained in the job
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config
    job_key: str | None = None  # rift_bn.pipeline.keys.job_key: the cache's runs/<job key>/
    outcomes: str | None = None  # per-image outcomes beside this file (OUTCOMES), None before version 2
    stats: dict[str, dict[str, float]] | None = None  # per metric: rift_bn.stats.paired_stats, base vs final
    bn_outputs: str | None = None  # Figure 3's data beside this file (rift_bn.report.bn_outputs), MRC runs
    corruptions: Corruptions | None = None  # eval.corruptions: base and final on CIFAR-10-C / CIFAR-100-C

    def to_dict(self) -> dict[str, Any]:
        """The file's content: version, identity (also at the top level, as in version 1), the fields."""
        identity = asdict(self.experiment)
        out: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "experiment": identity}
        out |= {k: identity[k] for k in IDENTITY_KEYS}
        return out | {f.name: getattr(self, f.name) for f in fields(self) if f.name != "experiment"}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "results") -> Results:
        """The record of a file's content (version 1 converted); ``source`` names it in errors."""
        version = d.get("schema_version", 1)
        if version == 1:
            d = _from_version_1(d, source)
        elif version != SCHEMA_VERSION:
            raise ResultsError(
                f"{source}: schema_version={version}: written by another rift_bn (this one reads "
                f"{SCHEMA_VERSION} and 1); use that version, or run the job again"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"schema_version", *IDENTITY_KEYS})
        if unknown:
            raise ResultsError(
                f"{source}: unknown field(s) {', '.join(unknown)} in a version-{SCHEMA_VERSION} record; "
                "written by another rift_bn"
            )
        for part in ("base", "final"):
            if not isinstance(d.get(part), dict) or not {"clean_acc", "robust_acc"} <= d[part].keys():
                raise ResultsError(f"{source}: {part} has no clean_acc/robust_acc; not a finished run")
        try:
            experiment = Experiment(**d["experiment"])
        except (KeyError, TypeError) as e:
            raise ResultsError(f"{source}: experiment is incomplete ({e}); not a finished run") from None
        return cls(experiment=experiment, **{k: v for k, v in d.items() if k in known - {"experiment"}})

    def as_written(self) -> Results:
        """This record as its file holds it: plain JSON data (a config Enum as its value, tuples as lists)."""
        return Results.from_dict(json.loads(json.dumps(self.to_dict(), default=str)))

    def write(self, path: str | Path) -> None:
        """Write the record to ``path`` atomically."""
        cache.write_json(path, self.to_dict())


def _from_version_1(d: dict[str, Any], source: str) -> dict[str, Any]:
    """A version-1 record (the same fields, the identity at the top level) with its ``experiment``."""
    missing = [k for k in ("stage", "dataset", "model", "seed") if k not in d]
    if missing:
        raise ResultsError(f"{source}: no {', '.join(missing)}; not a rift_bn results file")
    identity = {k: d.get(k) for k in IDENTITY_KEYS}
    config = d.get("config") or {}
    if identity["width"] is None:  # the oldest files kept it in the config alone
        identity["width"] = (config.get("model") or {}).get("width")
    if d["stage"] == "finetune" and not identity["bn_stats"]:  # before it was recorded: selected, always
        identity["bn_stats"] = (config.get("finetune") or {}).get("bn_stats") or "selected"
    known = {f.name for f in fields(Results)}
    group = _group(identity, config)
    out = {k: v for k, v in d.items() if k in known}
    return out | {"experiment": {"group": group, "name": None, **identity}}


OUTCOMES = "outcomes.npz"  # beside results.json: which test images base and final model get right


def write_outcomes(
    path: str | Path, test_index: np.ndarray, base: dict[str, np.ndarray], final: dict[str, np.ndarray]
) -> None:
    """``outcomes.npz``: ``test_index`` (positions in the official test set) and, per metric (``clean``,
    ``robust``, ``autoattack``), booleans ``base_<metric>`` and ``final_<metric>`` in that order."""
    arrays = {"test_index": np.asarray(test_index, dtype=np.int64)}
    for who, correct in (("base", base), ("final", final)):
        arrays |= {f"{who}_{k}": np.asarray(v, dtype=bool) for k, v in correct.items()}
    with cache.atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: numpy adds no suffix
        np.savez_compressed(f, **arrays)


def read_outcomes(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an ``outcomes.npz`` (see :func:`write_outcomes`)."""
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def outcome_stats(outcomes: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Paired base-vs-final statistics (``rift_bn.stats.paired_stats``) per metric of ``outcomes``."""
    from rift_bn.stats import paired_stats

    metrics = [k.removeprefix("base_") for k in outcomes if k.startswith("base_")]
    return {m: paired_stats(outcomes[f"base_{m}"], outcomes[f"final_{m}"]) for m in metrics}


def load(path: str | Path) -> Results:
    """The record in ``path``; an unreadable or unfinished file is a :class:`ResultsError`."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ResultsError(f"{path}: unreadable results file ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise ResultsError(f"{path}: not a JSON object; not a rift_bn results file")
    return Results.from_dict(d, str(path))
