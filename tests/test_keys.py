"""Cache keys by exclusion: every setting of a stage's sections keys its entries, except the named ones."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig, OmegaConf

from rift_bn.config import NON_RESULT_KEYS
from rift_bn.pipeline import keys
from rift_bn.pipeline.keys import CacheKeys
from tests.conftest import composed

H = "0123456789abcdef" * 4  # a base checkpoint's content hash
# another valid value for the string settings (the rest: numbers moved, booleans flipped, lists extended)
OTHER = {
    "cifar10": "cifar100",
    "resnet18": "preact_resnet18",
    "train": "eval",
    "train_holdout": "test_half",
    "8/255": "4/255",
    "2/255": "1/255",
    "auto": "cpu",
    "32-true": "bf16-mixed",
    "exact": "linear",
    "pgd": "pgd",  # the only attack
}
Entry = Callable[[CacheKeys], Path]
# (sections, settings excluded) of each entry, as the stage reads its config
ENTRIES: dict[str, tuple[Entry, tuple[str, ...], tuple[str, ...]]] = {
    "base": (lambda k: k.base_path(), keys.BASE_SECTIONS, keys.BASE_EXCLUDED),
    "adversarial set": (lambda k: k.adversarial_set_path(H, 500), keys.ADVERSARIAL_SET_SECTIONS, ()),
    "mrc": (lambda k: k.mrc_path(H), keys.MRC_SECTIONS, keys.MRC_EXCLUDED + keys.MRC_EXCLUDED_EXACT),
    "eval val": (lambda k: k.eval_path(H, "val"), keys.EVAL_SECTIONS, keys.EVAL_EXCLUDED["val"]),
    "eval test": (lambda k: k.eval_path(H, "test"), keys.EVAL_SECTIONS, keys.EVAL_EXCLUDED["test"]),
}


def _leaves(cfg: DictConfig, sections: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every setting in ``sections``."""

    def walk(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f"{prefix}.{k}")
        else:
            yield prefix, node

    for s in sections:
        yield from walk(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)[s], s)


def _changed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, list):
        return [*value, 1]
    if value is None:
        return 100
    return OTHER.get(value, f"{value}-elsewhere")  # paths and free text


def _with(cfg: DictConfig, key: str, value: Any) -> DictConfig:
    out = copy.deepcopy(cfg)
    OmegaConf.update(out, key, value, merge=False)
    return out


@pytest.mark.parametrize("entry", ENTRIES)
def test_every_setting_of_the_sections_keys_the_entry_except_the_excluded(entry: str) -> None:
    """A setting changes the entry's key unless it is excluded by name (or changes no number anywhere:
    ``config.NON_RESULT_KEYS``); the excluded ones leave it as it is."""
    path_of, sections, excluded = ENTRIES[entry]
    cfg = composed("scale=cpu")
    before = path_of(CacheKeys(cfg, "f" * 16, Path("cache")))
    seen = []
    for key, value in _leaves(cfg, sections):
        if value == "pgd":
            continue
        after = path_of(CacheKeys(_with(cfg, key, _changed(value)), "f" * 16, Path("cache")))
        assert (after == before) == (key in (*excluded, *NON_RESULT_KEYS)), key
        seen.append(key)
    assert len(seen) > 5 and set(excluded) <= set(seen)


def test_every_setting_of_at_keys_the_base_model() -> None:
    at = [key for key, _ in _leaves(composed("scale=cpu"), ("at",))]
    assert {"at.epochs", "at.lr", "at.milestones", "at.attack.steps", "at.attack_bn_mode"} <= set(at)
    assert not [key for key in at if key in keys.BASE_EXCLUDED]  # so the test above covers each one


def test_a_base_trained_another_way_has_its_own_slot() -> None:
    """DDP (another strategy, another process count: synchronised BN statistics, another float order) and
    another device are other base models."""
    cfg = composed("scale=cpu")
    single = CacheKeys(cfg, "f" * 16, Path("cache")).base_path()
    ddp = composed("scale=cpu", "trainer=ddp", "trainer.accelerator=cpu")
    assert CacheKeys(ddp, "f" * 16, Path("cache"), processes=2).base_path() != single
    assert CacheKeys(cfg, "f" * 16, Path("cache"), processes=2).base_path() != single  # devices=auto, 2 GPUs
    strategy = composed("scale=cpu", "trainer.strategy=ddp")
    assert CacheKeys(strategy, "f" * 16, Path("cache")).base_path() != single
    assert CacheKeys(cfg, "f" * 16, Path("cache"), device_type="cuda").base_path() != single
    assert CacheKeys(cfg, "f" * 16, Path("cache")).base_path() == single  # and the same run, the same slot
