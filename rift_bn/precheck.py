"""Check a command line before Hydra runs it: composition errors and bad settings as one-line messages."""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
PLAIN_FLAGS = {"-m", "--multirun"}


def _first_of_sweeps(overrides: list[str]) -> list[str]:
    """One job's overrides: the first value of every sweep (``k=1,2,3`` -> ``k=1``); hydra.* left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.get_key_element()
        if key.lstrip("+~").startswith("hydra"):
            continue
        if o.is_sweep_override():
            out.append(f"{key}={next(iter(o.sweep_string_iterator()))}")
        else:
            out.append(o.input_line)
    return out


def _explain(exc: Exception, overrides: list[str]) -> str:
    text = str(exc)
    missing = re.search(r"Could not find '([^'/]+)/([^']+)'", text)
    if missing:
        group, name = missing.groups()
        options = sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))
        return f"{group}={name}: unknown {group}; choose one of {', '.join(options)}"
    key = re.search(r"full_key: (\S+)", text) or re.search(r"Could not override '([^']+)'", text)
    if key:
        given = next((o for o in overrides if o.split("=", 1)[0].lstrip("+~") == key.group(1)), key.group(1))
        return (
            f"{given}: no such setting; check the spelling "
            "(`python -m rift_bn.run --cfg job` lists every key; add new keys with +key=value)"
        )
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def precheck(argv: list[str]) -> str | None:
    """None if the command line composes and validates, else the one-line reason."""
    if any(a.startswith("-") and a not in PLAIN_FLAGS for a in argv):
        return None  # --cfg, --help, --config-name ...: Hydra's own business
    overrides = [a for a in argv if a not in PLAIN_FLAGS]
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from rift_bn.config import ConfigError, validate

    try:
        job = _first_of_sweeps(overrides)
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=job)
        OmegaConf.resolve(cfg)
        validate(cfg)
    except ConfigError as e:
        return str(e)
    except (HydraException, ValueError, KeyError) as e:
        return _explain(e, overrides)
    return None
