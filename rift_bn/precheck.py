"""Check a command line before Hydra runs it: composition errors and bad settings as one-line messages.

Without ``-m``, a comma list (``k=1,2``) or a sweep experiment (``+experiment=topk``) is refused: Hydra would
fail in several lines, or silently run one default job of the sweep. A value, key or choice that the
schema (rift_bn.schema) refuses is named with its full key and what is allowed there; a misspelt key
names the nearest one of its section.

A multirun is checked job by job: every combination of the swept values (up to ``MAX_JOBS``), else
each value of each sweep with the other sweeps at their first value. The config is composed once per
distinct set of fixed and config-group overrides; swept plain values are applied to a copy of it the
way Hydra applies them, so a sweep over ``k`` or ``seed`` costs one composition.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    ConfigTypeError,
    InterpolationResolutionError,
    OmegaConfBaseException,
    ValidationError,
)

from rift_bn.config import ConfigError, as_written, suggest, unknown_key, validate

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
GROUPS = frozenset(p.name for p in Path(CONF_DIR).iterdir() if p.is_dir() and p.name != "hydra")
PLAIN_FLAGS = {"-m", "--multirun"}
MAX_JOBS = 64
__all__ = ["CONF_DIR", "MAX_JOBS", "precheck", "suggest"]

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override


class _Refused(Exception):
    """A one-line reason found while expanding the sweep."""


def _jobs(parsed: list[Override]) -> list[list[Override]]:
    """Each job to check, as one parsed override per command-line override (sweeps resolved).

    ``parsed`` excludes hydra.* overrides. Swept values are re-parsed as ``key=value`` like Hydra's
    basic sweeper does.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    options: list[list[Override]] = []
    for o in parsed:
        if not o.is_sweep_override():
            options.append([o])
            continue
        key = o.get_key_element()
        values = [f"{key}={v}" for v in o.sweep_string_iterator()]
        if not values:
            raise _Refused(f"{o.input_line}: the sweep has no values")
        options.append(parser.parse_overrides(values))
    if math.prod(len(opt) for opt in options) <= MAX_JOBS:
        return [list(job) for job in itertools.product(*options)]
    first = [opt[0] for opt in options]
    return [first] + [first[:i] + [v] + first[i + 1 :] for i, opt in enumerate(options) for v in opt[1:]]


def _is_group(o: Override) -> bool:
    return o.package is not None or o.key_or_group.split("/")[0] in GROUPS


def _check_jobs(
    parsed: list[Override], compose: Callable[[list[str]], DictConfig], validate: Callable[[DictConfig], None]
) -> None:
    """Compose and validate every job of ``_jobs(parsed)``; raises on the first bad one."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    apply = getattr(ConfigLoaderImpl, "_apply_overrides_to_config", None)
    swept = [src.is_sweep_override() and apply is not None for src in parsed]
    composed: dict[tuple[str, ...], DictConfig] = {}
    for job in _jobs(parsed):
        # swept plain values go on top of a cached composition; config groups go through compose
        late = [o for o, s in zip(job, swept, strict=True) if s and not _is_group(o)]
        early = tuple(o.input_line for o, s in zip(job, swept, strict=True) if not s or _is_group(o))
        if early not in composed:
            composed[early] = compose(list(early))
        cfg = copy.deepcopy(composed[early])
        if late:
            apply(late, cfg)
        _resolve(cfg)
        validate(cfg)


def _interpolated(node: object, prefix: str = "") -> list[str]:
    """Dotted keys of the leaves written as ``${...}`` in a plain container."""
    if isinstance(node, dict | list):
        items = node.items() if isinstance(node, dict) else enumerate(node)
        return [k for key, v in items for k in _interpolated(v, f"{prefix}{key}.")]
    return [prefix[:-1]] if isinstance(node, str) and "${" in node else []


def _resolve(cfg: DictConfig) -> None:
    """Resolve every interpolation in place; a failure names the setting whose value cannot be resolved."""
    try:
        OmegaConf.resolve(cfg)
    except InterpolationResolutionError as e:
        for key in _interpolated(OmegaConf.to_container(cfg, resolve=False)):
            try:
                OmegaConf.select(cfg, key)
            except InterpolationResolutionError as inner:
                raw = OmegaConf.to_container(cfg, resolve=False)
                for part in key.split("."):
                    raw = raw[int(part) if isinstance(raw, list) else part]  # type: ignore[index]
                raise _Refused(
                    f"{key}={raw}: cannot resolve it ({_first_line(inner)}); fix or replace it"
                ) from e
        raise


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_NOUNS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}
_PLURAL = {"a whole number": "whole numbers", "a number": "numbers", "a string": "strings"}


def _describe(tp: Any) -> str:
    """What a schema type allows, in command-line words."""
    args = [a for a in get_args(tp) if a is not type(None)]
    if len(args) < len(get_args(tp)):  # Optional[...]
        return f"{_describe(args[0])}, or null"
    if get_origin(tp) is list:
        inner = _describe(args[0])
        return f"a list of {_PLURAL.get(inner, inner)}"
    if isinstance(tp, type) and issubclass(tp, Enum):
        return ", ".join(tp)  # type: ignore[arg-type]
    if is_dataclass(tp):
        return f"a section with keys {', '.join(f.name for f in fields(tp))}"
    return _NOUNS.get(tp, str(tp))


def _schema_message(e: OmegaConfBaseException, overrides: list[str]) -> str | None:
    """One line for a value or key the schema refused: the full key, the value, what is allowed."""
    key, schema = str(e.full_key), e.object_type
    base = key.split("[")[0]  # a list element's key names the list
    given = next((o for o in overrides if re.match(rf"[+~]*{re.escape(base)}([.=\[]|$)", o)), None)
    if isinstance(e, ConfigAttributeError | ConfigKeyError) and is_dataclass(schema):
        return unknown_key(given or key, key, schema, GROUPS if "." not in key else ())  # type: ignore[arg-type]
    if isinstance(e, ValidationError):
        if is_dataclass(schema):
            expected = get_type_hints(schema)[e.key]
        else:  # an element of a list: the reference type is the list's annotation, maybe Optional
            listed = next(a for a in (*get_args(e.ref_type), e.ref_type) if get_origin(a) is list)
            expected = get_args(listed)[0]
        what = "unknown choice" if isinstance(expected, type) and issubclass(expected, Enum) else "wrong type"
        return f"{key}={as_written(e.value)}: {what}; allowed: {_describe(expected)}"
    if isinstance(e, ConfigTypeError) and given is not None and given.startswith("~"):
        return f"{given}: a setting of the schema cannot be deleted; set {key}=... instead"
    return None


def _explain(exc: Exception, overrides: list[str]) -> str:
    """One line for a Hydra / omegaconf error: the setting and what to do."""
    from hydra.errors import OverrideParseException

    text, first = str(exc), _first_line(exc)
    if isinstance(exc, OverrideParseException):
        return (
            f"{exc.override}: cannot parse it ({first}); quote values with special characters, "
            "see https://hydra.cc/docs/advanced/override_grammar/basic"
        )
    missing = re.search(r"Could not find '([^'/]+)/([^']+)'", text)
    if missing:
        group, name = missing.groups()
        options = sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))
        return f"{group}={name}: unknown choice; allowed: {', '.join(options)}"
    deleted = re.search(r"Could not delete from config. '([^']+)'", text)
    if deleted:
        return f"~{deleted.group(1)}: no such setting to delete; check the spelling"
    appended = re.search(r"Could not append to config. An item is already at '([^']+)'", text)
    if appended:
        key = appended.group(1)
        return f"+{key}: {key} exists already; set it without the + ({key}=...)"
    cause: BaseException | None = exc
    while cause is not None:  # Hydra wraps the schema's error: its cause names the key
        if isinstance(cause, OmegaConfBaseException) and cause.full_key:
            return _schema_message(cause, overrides) or f"{cause.full_key}: {_first_line(cause)}"
        cause = cause.__cause__
    return first


def _needs_multirun(parsed: list[Override]) -> None:
    """Without ``-m``: a swept value (``k=1,2``) is refused, one line naming the fix."""
    swept = next((o for o in parsed if o.is_sweep_override()), None)
    if swept is not None:
        raise _Refused(
            f"{swept.input_line}: several values make a sweep; add -m to run one job per value "
            "(or give one value)"
        )


def _single_job(
    compose: Callable[..., DictConfig], parsed: list[Override]
) -> Callable[[list[str]], DictConfig]:
    """``compose`` for a command line without ``-m``: refuses a config that sweeps (``+experiment=topk``
    sets ``hydra.sweeper.params``) unless the command line fixes every swept key, since Hydra would
    silently run one default job of the sweep."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    given = {o.get_key_element().lstrip("+~") for o in parsed}
    parser = OverridesParser.create()

    def compose_job(job: list[str]) -> DictConfig:
        cfg = compose("config", overrides=job, return_hydra_config=True)
        params = OmegaConf.select(cfg, "hydra.sweeper.params")
        plain = OmegaConf.to_container(params, resolve=False) if isinstance(params, DictConfig) else {}
        swept = [
            f"{key}={value}"
            for key, value in plain.items()  # type: ignore[union-attr]
            if key not in given and parser.parse_override(f"{key}={value}").is_sweep_override()
        ]
        if swept:
            experiment = next(
                (o.input_line for o in parsed if o.get_key_element().lstrip("+") == "experiment"), ""
            )
            raise _Refused(
                f"{experiment or 'this config'} is a sweep over {' '.join(swept)}: add -m to run it "
                f"(or fix {', '.join(s.split('=')[0] + '=...' for s in swept)} to run one job)"
            )
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg

    return compose_job


def precheck(argv: list[str]) -> str | None:
    """None if every job of the command line composes and validates, else the one-line reason."""
    if any(a.startswith("-") and a not in PLAIN_FLAGS for a in argv):
        return None  # --cfg, --help, --config-name ...: Hydra's own business
    multirun = any(a in PLAIN_FLAGS for a in argv)
    overrides = [a for a in argv if a not in PLAIN_FLAGS]
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
            parsed = [
                o
                for o in parser.parse_overrides(overrides)
                if not o.get_key_element().lstrip("+~").startswith("hydra")
            ]
            if multirun:
                _check_jobs(parsed, lambda job: compose("config", overrides=job), validate)
            else:
                _needs_multirun(parsed)
                _check_jobs(parsed, _single_job(compose, parsed), validate)
    except (ConfigError, _Refused) as e:
        return str(e)
    except (HydraException, OmegaConfBaseException, ValueError, KeyError) as e:
        return _explain(e, overrides)
    return None
