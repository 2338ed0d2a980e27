"""Configuration checks that run before any work, and small parsing helpers."""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig

DATASETS = ("cifar10", "cifar100")
MODELS = ("resnet18", "preact_resnet18", "wrn34_10")
METHODS = ("rift", "rift_bn", "full", "bn_only", "conv_linear_only")
STAGES = ("at", "finetune")
LOGGERS = ("wandb", "csv", "tensorboard", "none")


class ConfigError(ValueError):
    """A setting the user must change; the message is one line naming the setting and the fix."""


def pixels(value: float | int | str, key: str) -> float:
    """A pixel-scale number given as a float or a fraction string like '8/255'."""
    try:
        if isinstance(value, str) and "/" in value:
            num, den = value.split("/")
            return float(num) / float(den)
        return float(value)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"{key}={value}: not a number; write e.g. {key}=8/255 or {key}=0.0314") from None


def _choice(value: str, key: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value}: unknown; choose one of {', '.join(choices)}")


def _at_least(value: object, key: str, low: float, hint: str = "") -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low:
        raise ConfigError(f"{key}={value}: must be a number >= {low}{hint}")


def validate(cfg: DictConfig) -> None:
    """Refuse bad settings before any work starts (one-line ConfigError)."""
    _choice(cfg.stage, "stage", STAGES)
    _choice(cfg.data.name, "data", DATASETS)
    _choice(cfg.model.name, "model", MODELS)
    _choice(cfg.method.name, "method", METHODS)
    _choice(cfg.logger.name, "logger", LOGGERS)
    _choice(cfg.finetune.bn_stats, "finetune.bn_stats", ("selected", "all", "none"))
    if cfg.trainer.get("deterministic", False) not in (True, False, "warn"):
        raise ConfigError(f"trainer.deterministic={cfg.trainer.deterministic}: choose true, false or warn")
    _choice(cfg.mrc.estimator, "mrc.estimator", ("exact", "linear"))
    if not isinstance(cfg.mrc.get("linear_step", False), bool):
        raise ConfigError(f"mrc.linear_step={cfg.mrc.linear_step}: must be true or false")
    _at_least(cfg.k, "k", 1, " (how many lowest-MRC modules to fine-tune)")
    _at_least(cfg.model.width, "model.width", 1)
    for prefix, attack in (("attack", cfg.attack), ("at.attack", cfg.at.attack)):
        eps, alpha = pixels(attack.eps, f"{prefix}.eps"), pixels(attack.alpha, f"{prefix}.alpha")
        if not 0 <= eps <= 1:
            raise ConfigError(
                f"{prefix}.eps={attack.eps}: must lie in [0, 1] on the pixel scale (paper: 8/255)"
            )
        if not 0 < alpha <= 1:
            raise ConfigError(
                f"{prefix}.alpha={attack.alpha}: must lie in (0, 1] on the pixel scale (paper: 2/255)"
            )
        _at_least(attack.steps, f"{prefix}.steps", 0)
    _at_least(cfg.attack.restarts, "attack.restarts", 1)
    for key in ("at.epochs", "finetune.epochs", "mrc.epochs"):
        section, name = key.split(".")
        _at_least(cfg[section][name], key, 1, " (number of epochs)")
    for key in ("at.lr", "finetune.lr", "mrc.lr", "mrc.epsilon", "interpolation.tolerance"):
        section, name = key.split(".")
        _at_least(cfg[section][name], key, 0)
    for key in ("at.batch_size", "finetune.batch_size", "mrc.batch_size", "eval.batch_size"):
        section, name = key.split(".")
        _at_least(cfg[section][name], key, 1)
    _at_least(cfg.data.val_size, "data.val_size", 1, " (the selection split must not be empty)")
    for key in ("train_subset", "test_subset"):
        if cfg.data[key] is not None:
            _at_least(cfg.data[key], f"data.{key}", 1, " or null for all")
    if cfg.mrc.num_examples is not None:
        _at_least(cfg.mrc.num_examples, "mrc.num_examples", 1, " or null for the whole selection split")
    alphas = list(cfg.interpolation.alphas)
    if not alphas or any(not 0 <= float(a) <= 1 for a in alphas):
        raise ConfigError(f"interpolation.alphas={alphas}: need a non-empty list of values in [0, 1]")
    if cfg.base.checkpoint is not None:
        path = Path(str(cfg.base.checkpoint)).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"base.checkpoint={cfg.base.checkpoint}: file not found; pass an existing "
                "checkpoint or base.checkpoint=null to use (or train) the cached base model"
            )
