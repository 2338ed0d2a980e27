"""The checks the schema (rift_bn.schema) cannot express, run before any work, and small parsing helpers.

Types, keys and choices are refused by OmegaConf against the schema while the config is composed. What is
left here: ranges, ``8/255`` pixel strings, rules across fields, the environment, and keys that Hydra's
``+key=...`` and ``~key`` add or remove around the schema.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Iterable
from dataclasses import fields, is_dataclass
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from rift_bn.errors import UserError
from rift_bn.schema import Accelerator, Kind, LoggerName, SelectionSource

WANDB_MODES = ("offline", "online", "disabled", "dryrun", "shared", "run")  # wandb.Settings.mode
SEED_MAX = 2**32 - 1  # Lightning's seed_everything range
# Settings that change no number: a job (and a report's experiment) is the same wherever its data and
# caches live and whatever it logs to. rift_bn.pipeline.keys drops them from every key.
NON_RESULT_KEYS: tuple[str, ...] = (
    "logger",
    "force",
    "cache_dir",
    "data.root",
    "data.download",
    "trainer.progress_bar",
    "trainer.log_every_n_steps",
)
# The corruption evaluation's settings: with eval.corruptions=false they change no number either, and a job
# (and a report's experiment) is the one it was before they existed.
CORRUPTION_KEYS: tuple[str, ...] = ("eval.corruptions", "eval.corruptions_subset", "eval.corruptions_attack")


def unused_corruption_keys(config: DictConfig | dict) -> tuple[str, ...]:
    """The settings of :data:`CORRUPTION_KEYS` that change nothing in a run of ``config`` (all of them with
    ``eval.corruptions`` false or absent, as in files written before it existed; else none)."""
    corruptions = (config.get("eval") or {}).get("corruptions", False)
    return CORRUPTION_KEYS if corruptions is False else ()


class ConfigError(UserError, ValueError):
    """A setting the user must change; the message is one line naming the setting and the fix.

    Also a ``ValueError``: the library raised ``ValueError`` for the same mistakes before (tests match it)."""


def as_written(value: object) -> str:
    """A value as it is written on the command line (lists without quotes)."""
    if isinstance(value, ListConfig | list | tuple):
        return "[" + ",".join(as_written(v) for v in value) + "]"
    if isinstance(value, DictConfig):
        return str(OmegaConf.to_container(value))
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def pixels(value: float | int | str, key: str) -> float:
    """A pixel-scale number given as a float or a fraction string like '8/255'."""
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, str) and "/" in value:
            num, den = value.split("/")
            out = float(num) / float(den)
        else:
            out = float(value)  # type: ignore[arg-type]
        if not math.isfinite(out):
            raise ValueError
        return out
    except (TypeError, ValueError, ZeroDivisionError):
        raise ConfigError(
            f"{key}={as_written(value)}: not a number; write e.g. {key}=8/255 or {key}=0.0314"
        ) from None


def suggest(key: str, keys: list[str]) -> str | None:
    """The valid key nearest to a misspelt one (``mrc.epoch`` -> ``mrc.epochs``), if any is close."""
    parent, _, leaf = key.rpartition(".")
    # first the names in the same section (``mrc.epoch`` -> ``mrc.epochs``), then any key (stricter)
    same = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == parent}
    for word, pool, cutoff in ((leaf, same, 0.6), (key, {k: k for k in keys}, 0.75)):
        close = difflib.get_close_matches(word, list(pool), n=1, cutoff=cutoff)
        if close and pool[close[0]] != key:
            return pool[close[0]]
    return None


def unknown_key(given: str, key: str, schema: type, extra: Iterable[str] = ()) -> str:
    """One line for ``key``, which the section ``schema`` lacks: ``given`` (as written), the nearest
    key and the allowed ones (``extra``: other names allowed there, such as config groups)."""
    section = key.rpartition(".")[0]
    names = sorted({f.name for f in fields(schema)} | set(extra))
    prefix = f"{section}." if section else ""
    near = suggest(key, [prefix + n for n in names])
    hint = f"did you mean {near}?" if near else "check the spelling"
    where = f"keys of {section}" if section else "top-level keys"
    return f"{given}: no such setting ({hint}); allowed {where}: {', '.join(names)}"


def _check_keys(node: DictConfig, prefix: str = "") -> None:
    """Each section holds exactly its schema's keys, none missing (``+key=...`` and ``~key`` bypass it)."""
    schema = OmegaConf.get_type(node)
    names = [f.name for f in fields(schema)]  # type: ignore[arg-type]
    for key in node:
        if key not in names:
            given = f"+{prefix}{key}={as_written(node[key])}"
            raise ConfigError(unknown_key(given, f"{prefix}{key}", schema))  # type: ignore[arg-type]
    for name in names:
        if name not in node or OmegaConf.is_missing(node, name):
            raise ConfigError(
                f"{prefix}{name}: required setting is missing; set {prefix}{name}=... or drop the "
                "override that removed it"
            )
        if is_dataclass(OmegaConf.get_type(child := node[name])):  # a section, not a dict in an Any field
            _check_keys(child, f"{prefix}{name}.")


def _at_least(value: float, key: str, low: float, hint: str = "") -> None:
    if not (math.isfinite(value) and value >= low):
        raise ConfigError(f"{key}={as_written(value)}: must be a number >= {low}{hint}")


def _whole(value: int | None, key: str, low: int, hint: str = "") -> None:
    """A whole number >= ``low``, or null where the schema allows it."""
    if value is not None and value < low:
        raise ConfigError(f"{key}={as_written(value)}: must be a whole number >= {low}{hint}")


def _check_devices(devices: object, accelerator: Accelerator) -> None:
    """Lightning's ``devices``: a count (-1 = all), 'auto', a list of device ids or a string of them."""
    whole = isinstance(devices, int) and not isinstance(devices, bool)
    ok = (
        (whole and (devices >= 1 or devices == -1))  # type: ignore[operator]
        or devices == "auto"
        or (
            isinstance(devices, ListConfig)
            and len(devices) > 0
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices)
            and len(set(devices)) == len(devices)
        )
        or (isinstance(devices, str) and devices.replace(",", "").strip().isdigit())
    )
    if accelerator == Accelerator.cpu and ok and not (devices == "auto" or (whole and devices >= 1)):  # type: ignore[operator]
        raise ConfigError(
            f"trainer.devices={as_written(devices)}: with trainer.accelerator=cpu give a process count >= 1"
        )
    if not ok:
        raise ConfigError(
            f"trainer.devices={as_written(devices)}: give a device count >= 1 (-1 = all), auto, "
            "or a list of device ids like [0,1]"
        )


def _validate_trainer(cfg: DictConfig) -> None:
    t = cfg.trainer
    _check_devices(t.devices, t.accelerator)
    if t.deterministic not in (True, False, "warn"):
        raise ConfigError(f"trainer.deterministic={as_written(t.deterministic)}: choose true, false or warn")
    _whole(t.num_nodes, "trainer.num_nodes", 1)
    _whole(t.log_every_n_steps, "trainer.log_every_n_steps", 1)
    devices = t.devices
    count = len(devices) if isinstance(devices, ListConfig) else devices if isinstance(devices, int) else 0
    world = count * t.num_nodes  # processes (Lightning runs DDP for several devices)
    if world > 1:  # a training batch is split among the processes
        for key in ("at.batch_size", "finetune.batch_size"):
            size = OmegaConf.select(cfg, key)
            if size % world:
                raise ConfigError(
                    f"{key}={size}: a step's batch is split among trainer.devices x trainer.num_nodes = "
                    f"{world} processes; choose a multiple of {world}"
                )


def _validate_logger(cfg: DictConfig) -> None:
    if cfg.logger.name != LoggerName.wandb:
        return
    env = os.environ.get("WANDB_MODE")
    checks = [("WANDB_MODE (environment variable)", env)] if env else []  # rift_bn.loggers: env wins
    for key, mode in [*checks, ("logger.mode", cfg.logger.mode)]:
        if mode not in WANDB_MODES:
            raise ConfigError(f"{key}={mode}: unknown; choose one of {', '.join(WANDB_MODES)}")


def _validate_optimizers(cfg: DictConfig) -> None:
    for section in ("at", "finetune"):
        s = cfg[section]
        _whole(s.epochs, f"{section}.epochs", 1, " (number of epochs)")
        _whole(s.batch_size, f"{section}.batch_size", 1)
        _at_least(s.lr, f"{section}.lr", 0)
        _at_least(s.weight_decay, f"{section}.weight_decay", 0)
        _at_least(s.gamma, f"{section}.gamma", 0, " (the lr factor at each milestone)")
        if not 0 <= s.momentum < 1:
            raise ConfigError(f"{section}.momentum={as_written(s.momentum)}: must lie in [0, 1) (paper: 0.9)")
        if s.milestones is not None and any(m < 0 for m in s.milestones):
            raise ConfigError(f"{section}.milestones={as_written(s.milestones)}: epochs are >= 0; e.g. [2,4]")


def _validate_sizes(cfg: DictConfig) -> None:
    d, m = cfg.data, cfg.mrc
    _whole(d.val_size, "data.val_size", 1, " (the selection split must not be empty)")
    _whole(d.train_subset, "data.train_subset", 1, " or null for all")
    _whole(d.test_subset, "data.test_subset", 1, " or null for all")
    _whole(m.epochs, "mrc.epochs", 1, " (number of epochs)")
    _whole(m.batch_size, "mrc.batch_size", 1)
    hint = " (RiFT: 20) or null for one pass over the set"
    _whole(m.steps_per_epoch, "mrc.steps_per_epoch", 1, hint)
    hint = " (how many lowest MRCs to compute exactly) or null for all"
    _whole(m.exact_lowest, "mrc.exact_lowest", 1, hint)
    _whole(cfg.eval.batch_size, "eval.batch_size", 1)
    _whole(m.num_examples, "mrc.num_examples", 1, " or null for the whole selection split")
    held_out = d.selection_source == SelectionSource.train_holdout  # test_half: half the test set
    if held_out and m.num_examples is not None and m.num_examples > d.val_size:
        raise ConfigError(
            f"mrc.num_examples={m.num_examples}: larger than the selection split "
            f"(data.val_size={d.val_size}); lower it, raise data.val_size, or set mrc.num_examples=null "
            "for the whole split"
        )


def _validate_attacks(cfg: DictConfig) -> None:
    for prefix in ("attack", "at.attack"):
        a = OmegaConf.select(cfg, prefix)
        eps, alpha = pixels(a.eps, f"{prefix}.eps"), pixels(a.alpha, f"{prefix}.alpha")
        if not 0 <= eps <= 1:
            raise ConfigError(f"{prefix}.eps={a.eps}: must lie in [0, 1] on the pixel scale (paper: 8/255)")
        if not 0 < alpha <= 1:
            raise ConfigError(
                f"{prefix}.alpha={a.alpha}: must lie in (0, 1] on the pixel scale (paper: 2/255)"
            )
        _whole(a.steps, f"{prefix}.steps", 0)
    _whole(cfg.attack.restarts, "attack.restarts", 1)


def _validate_interpolation(cfg: DictConfig) -> None:
    alphas = cfg.interpolation.alphas
    if not alphas or any(not 0 <= a <= 1 for a in alphas):  # NaN fails the comparison too
        raise ConfigError(
            f"interpolation.alphas={as_written(alphas)}: need a non-empty list of numbers in [0, 1], "
            "e.g. interpolation.alphas=[0,0.5,1]"
        )
    if len(alphas) > 1 and 0 not in alphas:  # one alpha: that model as it is (layer_types: [1.0])
        raise ConfigError(
            f"interpolation.alphas={as_written(alphas)}: must include 0 (the base model, which the alpha* "
            "rule falls back to when no other point keeps its robust accuracy); e.g. "
            f"interpolation.alphas=[0,{','.join(as_written(a) for a in alphas)}]"
        )
    _at_least(cfg.interpolation.tolerance, "interpolation.tolerance", 0)


def corruption_names(value: object) -> tuple[str, ...]:
    """The corruptions ``eval.corruptions`` asks for: none (false), RiFT's 18 (true), or the list given (each
    once, from the 19 of the official CIFAR-10-C / CIFAR-100-C folders)."""
    if value is False:
        return ()
    from rift_bn.data.corruptions import ALL_CORRUPTIONS, RIFT_CORRUPTIONS  # imports torch

    if value is True:
        return RIFT_CORRUPTIONS
    names = list(value) if isinstance(value, ListConfig | list | tuple) else []
    problems = [f"{n} is unknown" for n in names if n not in ALL_CORRUPTIONS]
    problems += [f"{n} is listed twice" for n in names if names.count(n) > 1]
    if not names or problems:
        raise ConfigError(
            f"eval.corruptions={as_written(value)}: {problems[0] if problems else 'not a list'}; choose true "
            f"(RiFT's 18 corruptions), false, or a list of distinct names such as [fog,snow] from "
            f"{', '.join(ALL_CORRUPTIONS)}"
        )
    return tuple(names)


def _validate_corruptions(cfg: DictConfig) -> None:
    """``eval.corruptions``: a valid choice whose files are where the run will read them (before any work)."""
    e = cfg.eval
    _whole(e.corruptions_subset, "eval.corruptions_subset", 1, " or null for every image of a severity")
    names = corruption_names(e.corruptions)
    if not names:
        return
    from rift_bn.data.corruptions import DataError, check_corruption_files

    try:
        check_corruption_files(cfg.data.root, cfg.data.name, names)
    except DataError as err:
        raise ConfigError(f"eval.corruptions={as_written(e.corruptions)}: {err}") from None


def validate(cfg: DictConfig) -> None:
    """Refuse what the schema lets through (one-line ConfigError naming the setting) before any work."""
    _check_keys(cfg)
    if not 0 <= cfg.seed <= SEED_MAX:
        raise ConfigError(f"seed={cfg.seed}: must be a whole number in [0, {SEED_MAX}]")
    _whole(cfg.k, "k", 1, " (how many lowest-MRC modules to fine-tune)")
    _whole(cfg.model.width, "model.width", 1)
    if not cfg.method.kinds:
        raise ConfigError(f"method.kinds=[]: need at least one module kind; allowed: {', '.join(Kind)}")
    _validate_logger(cfg)
    _validate_trainer(cfg)
    _validate_attacks(cfg)
    _validate_optimizers(cfg)
    _validate_sizes(cfg)
    _at_least(cfg.mrc.lr, "mrc.lr", 0)
    _at_least(cfg.mrc.epsilon, "mrc.epsilon", 0)
    _validate_interpolation(cfg)
    _validate_corruptions(cfg)
    checkpoint = cfg.base.checkpoint
    if checkpoint is not None and not Path(checkpoint).expanduser().is_file():
        raise ConfigError(
            f"base.checkpoint={checkpoint}: file not found; pass an existing "
            "checkpoint or base.checkpoint=null to use (or train) the cached base model"
        )
