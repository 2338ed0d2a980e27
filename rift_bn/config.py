"""Configuration checks that run before any work, and small parsing helpers."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ConfigTypeError

DATASETS = ("cifar10", "cifar100")
MODELS = ("resnet18", "preact_resnet18", "wrn34_10")
METHODS = ("rift", "rift_bn", "full", "bn_only", "conv_linear_only")
STAGES = ("at", "finetune")
LOGGERS = ("wandb", "csv", "tensorboard", "none")
KINDS = ("conv", "linear", "bn")  # the keys of rift_bn.models.CANDIDATE_KINDS (no torch import here)
SELECTIONS = ("mrc", "all")
# Lightning precisions the code handles (evaluate.autocast; models stay float32 outside the Trainer)
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
WANDB_MODES = ("offline", "online", "disabled", "dryrun", "shared", "run")  # wandb.Settings.mode
SEED_MAX = 2**32 - 1  # Lightning's seed_everything range
BOOLEANS = (
    "force",
    "base.train_if_missing",
    "data.download",
    "model.compile",
    "model.channels_last",
    "attack.random_start",
    "at.attack.random_start",
    "eval.autoattack",
    "mrc.shuffle",
    "trainer.progress_bar",
)
_ABSENT = object()
# Settings that change no number: a job (and a report's experiment) is the same wherever its data and
# caches live and whatever it logs to. rift_bn.run drops them from the job key.
NON_RESULT_KEYS: tuple[str, ...] = (
    "logger",
    "force",
    "cache_dir",
    "data.root",
    "data.download",
    "trainer.progress_bar",
    "trainer.log_every_n_steps",
)
# model.width of the CPU-scale profiles (scale=cpu, smoke): a narrow network of each architecture.
# ResNets count first-stage channels (64 standard), WideResNet its widen factor (10 standard).
SMALL_WIDTH = {"resnet18": 16, "preact_resnet18": 16, "wrn34_10": 1}
OmegaConf.register_new_resolver("small_width", lambda name: SMALL_WIDTH.get(name, 16), replace=True)


class ConfigError(ValueError):
    """A setting the user must change; the message is one line naming the setting and the fix."""


def _fmt(value: object) -> str:
    """A value as it is written on the command line (lists without quotes)."""
    if isinstance(value, ListConfig | list | tuple):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
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
            f"{key}={_fmt(value)}: not a number; write e.g. {key}=8/255 or {key}=0.0314"
        ) from None


def _get(cfg: DictConfig, key: str, default: Any = _ABSENT) -> Any:
    """``cfg.<key>``; a missing required key is a ConfigError, not an omegaconf traceback."""
    try:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
    except (ConfigKeyError, ConfigTypeError):  # a section replaced by a list or a scalar
        value = _ABSENT
    if value is _ABSENT:
        if default is not _ABSENT:
            return default
        raise ConfigError(
            f"{key}: required setting is missing; set {key}=... or drop the override that removed it"
        )
    return value


def _choice(value: object, key: str, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{key}={_fmt(value)}: unknown; choose one of {', '.join(choices)}")


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _at_least(value: object, key: str, low: float, hint: str = "") -> None:
    if not _is_real(value) or value < low:  # type: ignore[operator]
        raise ConfigError(f"{key}={_fmt(value)}: must be a number >= {low}{hint}")


def _whole(value: object, key: str, low: int, hint: str = "") -> None:
    if not _is_whole(value) or value < low:  # type: ignore[operator]
        raise ConfigError(f"{key}={_fmt(value)}: must be a whole number >= {low}{hint}")


def _check_devices(devices: object, accelerator: object) -> None:
    """Lightning's ``devices``: a count (-1 = all), 'auto', a list of device ids or a string of them."""
    ok = (
        (_is_whole(devices) and (devices >= 1 or devices == -1))  # type: ignore[operator]
        or devices == "auto"
        or (
            isinstance(devices, ListConfig | list)
            and len(devices) > 0
            and all(_is_whole(d) and d >= 0 for d in devices)
            and len(set(devices)) == len(devices)
        )
        or (isinstance(devices, str) and devices.replace(",", "").strip().isdigit())
    )
    if accelerator == "cpu" and ok and not (devices == "auto" or (_is_whole(devices) and devices >= 1)):  # type: ignore[operator]
        raise ConfigError(
            f"trainer.devices={_fmt(devices)}: with trainer.accelerator=cpu give a process count >= 1"
        )
    if not ok:
        raise ConfigError(
            f"trainer.devices={_fmt(devices)}: give a device count >= 1 (-1 = all), auto, "
            "or a list of device ids like [0,1]"
        )


def _validate_trainer(cfg: DictConfig) -> None:
    accelerator = _get(cfg, "trainer.accelerator")
    _choice(accelerator, "trainer.accelerator", ACCELERATORS)
    _check_devices(_get(cfg, "trainer.devices"), accelerator)
    precision = _get(cfg, "trainer.precision")
    if precision not in PRECISIONS or not isinstance(precision, str):
        raise ConfigError(
            f"trainer.precision={_fmt(precision)}: unsupported; choose one of {', '.join(PRECISIONS)}"
        )
    if _get(cfg, "trainer.deterministic", False) not in (True, False, "warn"):
        raise ConfigError(
            f"trainer.deterministic={_fmt(cfg.trainer.deterministic)}: choose true, false or warn"
        )
    _whole(_get(cfg, "trainer.num_nodes"), "trainer.num_nodes", 1)
    _whole(_get(cfg, "trainer.log_every_n_steps"), "trainer.log_every_n_steps", 1)
    devices = _get(cfg, "trainer.devices")
    count = len(devices) if isinstance(devices, ListConfig | list) else devices if _is_whole(devices) else 0
    world = count * _get(cfg, "trainer.num_nodes")  # processes (Lightning runs DDP for several devices)
    if world > 1:  # a training batch is split among the processes
        for key in ("at.batch_size", "finetune.batch_size"):
            size = _get(cfg, key)
            if _is_whole(size) and size % world:
                raise ConfigError(
                    f"{key}={size}: a step's batch is split among trainer.devices x trainer.num_nodes = "
                    f"{world} processes; choose a multiple of {world}"
                )


def _validate_logger(cfg: DictConfig) -> None:
    name = _get(cfg, "logger.name")
    _choice(name, "logger", LOGGERS)
    if name != "wandb":
        return
    env = os.environ.get("WANDB_MODE")
    if env:  # rift_bn.loggers: the environment wins over logger.mode
        _choice(env, "WANDB_MODE (environment variable)", WANDB_MODES)
    _choice(_get(cfg, "logger.mode"), "logger.mode", WANDB_MODES)


def _validate_optimizers(cfg: DictConfig) -> None:
    for section in ("at", "finetune"):
        _whole(_get(cfg, f"{section}.epochs"), f"{section}.epochs", 1, " (number of epochs)")
        _whole(_get(cfg, f"{section}.batch_size"), f"{section}.batch_size", 1)
        _at_least(_get(cfg, f"{section}.lr"), f"{section}.lr", 0)
        _at_least(_get(cfg, f"{section}.weight_decay"), f"{section}.weight_decay", 0)
        _at_least(_get(cfg, f"{section}.gamma"), f"{section}.gamma", 0, " (the lr factor at each milestone)")
        momentum = _get(cfg, f"{section}.momentum")
        if not _is_real(momentum) or not 0 <= momentum < 1:
            raise ConfigError(f"{section}.momentum={_fmt(momentum)}: must lie in [0, 1) (paper: 0.9)")
        milestones = _get(cfg, f"{section}.milestones")
        nullable = section == "finetune"
        if not (
            (milestones is None and nullable)
            or (isinstance(milestones, ListConfig) and all(_is_whole(m) and m >= 0 for m in milestones))
        ):
            raise ConfigError(
                f"{section}.milestones={_fmt(milestones)}: need a list of epochs like [2,4]"
                + (" or null for [epochs // 2]" if nullable else "")
            )


def _validate_sizes(cfg: DictConfig) -> None:
    val_size = _get(cfg, "data.val_size")
    _whole(val_size, "data.val_size", 1, " (the selection split must not be empty)")
    for key in ("data.train_subset", "data.test_subset"):
        if (value := _get(cfg, key)) is not None:
            _whole(value, key, 1, " or null for all")
    _whole(_get(cfg, "mrc.epochs"), "mrc.epochs", 1, " (number of epochs)")
    _whole(_get(cfg, "mrc.batch_size"), "mrc.batch_size", 1)
    if (steps := _get(cfg, "mrc.steps_per_epoch")) is not None:
        _whole(steps, "mrc.steps_per_epoch", 1, " (RiFT: 20) or null for one pass over the set")
    if (lowest := _get(cfg, "mrc.exact_lowest", None)) is not None:
        _whole(lowest, "mrc.exact_lowest", 1, " (how many lowest MRCs to compute exactly) or null for all")
    _whole(_get(cfg, "eval.batch_size"), "eval.batch_size", 1)
    num = _get(cfg, "mrc.num_examples")
    if num is not None:
        _whole(num, "mrc.num_examples", 1, " or null for the whole selection split")
        if num > val_size and _get(cfg, "data.selection_source") == "train_holdout":
            raise ConfigError(
                f"mrc.num_examples={num}: larger than the selection split (data.val_size={val_size}); "
                "lower it, raise data.val_size, or set mrc.num_examples=null for the whole split"
            )


def validate(cfg: DictConfig) -> None:
    """Refuse bad settings before any work starts (one-line ConfigError naming the setting)."""
    _choice(_get(cfg, "stage"), "stage", STAGES)
    _choice(_get(cfg, "data.name"), "data", DATASETS)
    classes = {"cifar10": 10, "cifar100": 100}[cfg.data.name]
    if _get(cfg, "data.num_classes", classes) != classes:  # informational: the data decide the count
        raise ConfigError(
            f"data.num_classes={_fmt(cfg.data.num_classes)}: {cfg.data.name} has {classes} classes; "
            "drop the override (choose another dataset with data=...)"
        )
    _choice(_get(cfg, "model.name"), "model", MODELS)
    _choice(_get(cfg, "method.name"), "method", METHODS)
    _choice(_get(cfg, "method.selection"), "method.selection", SELECTIONS)
    kinds = _get(cfg, "method.kinds")
    if not isinstance(kinds, ListConfig) or not kinds or any(k not in KINDS for k in kinds):
        raise ConfigError(
            f"method.kinds={_fmt(kinds)}: need a non-empty list of module kinds from {', '.join(KINDS)}"
        )
    _validate_logger(cfg)
    _validate_trainer(cfg)
    _choice(_get(cfg, "finetune.bn_stats"), "finetune.bn_stats", ("selected", "all", "none"))
    _choice(_get(cfg, "mrc.estimator"), "mrc.estimator", ("exact", "linear"))
    _choice(_get(cfg, "at.attack_bn_mode"), "at.attack_bn_mode", ("train", "eval"))
    _choice(_get(cfg, "data.selection_source"), "data.selection_source", ("train_holdout", "test_half"))
    precision = _get(cfg, "eval.precision")
    if precision not in PRECISIONS or not isinstance(precision, str):
        raise ConfigError(
            f"eval.precision={_fmt(precision)}: unsupported; choose one of {', '.join(PRECISIONS)} "
            "(32-true, the default, evaluates in float32)"
        )
    for key in (*BOOLEANS, "mrc.linear_step"):
        value = _get(cfg, key, False if key == "mrc.linear_step" else _ABSENT)
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={_fmt(value)}: must be true or false")
    seed = _get(cfg, "seed")
    if not _is_whole(seed) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"seed={_fmt(seed)}: must be a whole number in [0, {SEED_MAX}]")
    _whole(_get(cfg, "k"), "k", 1, " (how many lowest-MRC modules to fine-tune)")
    _whole(_get(cfg, "model.width"), "model.width", 1)
    for prefix in ("attack", "at.attack"):
        eps_raw, alpha_raw = _get(cfg, f"{prefix}.eps"), _get(cfg, f"{prefix}.alpha")
        eps, alpha = pixels(eps_raw, f"{prefix}.eps"), pixels(alpha_raw, f"{prefix}.alpha")
        if not 0 <= eps <= 1:
            raise ConfigError(f"{prefix}.eps={eps_raw}: must lie in [0, 1] on the pixel scale (paper: 8/255)")
        if not 0 < alpha <= 1:
            raise ConfigError(
                f"{prefix}.alpha={alpha_raw}: must lie in (0, 1] on the pixel scale (paper: 2/255)"
            )
        _whole(_get(cfg, f"{prefix}.steps"), f"{prefix}.steps", 0)
    _whole(_get(cfg, "attack.restarts"), "attack.restarts", 1)
    _validate_optimizers(cfg)
    _validate_sizes(cfg)
    for key in ("mrc.lr", "mrc.epsilon", "interpolation.tolerance"):
        _at_least(_get(cfg, key), key, 0)
    alphas = _get(cfg, "interpolation.alphas")
    if (
        not isinstance(alphas, ListConfig)
        or not alphas
        or any(not _is_real(a) or not 0 <= a <= 1 for a in alphas)
    ):
        raise ConfigError(
            f"interpolation.alphas={_fmt(alphas)}: need a non-empty list of numbers in [0, 1], "
            "e.g. interpolation.alphas=[0,0.5,1]"
        )
    if len(alphas) > 1 and 0 not in alphas:  # one alpha: that model as it is (layer_types: [1.0])
        raise ConfigError(
            f"interpolation.alphas={_fmt(alphas)}: must include 0 (the base model, which the alpha* rule "
            f"falls back to when no other point keeps its robust accuracy); e.g. "
            f"interpolation.alphas=[0,{','.join(_fmt(a) for a in alphas)}]"
        )
    checkpoint = _get(cfg, "base.checkpoint")
    if checkpoint is not None:
        path = Path(str(checkpoint)).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"base.checkpoint={checkpoint}: file not found; pass an existing "
                "checkpoint or base.checkpoint=null to use (or train) the cached base model"
            )
