"""Cache keys by exclusion: an entry is named by a hash of the whole config sections its stage reads, minus
a named list of the settings there that change none of its numbers (and ``config.NON_RESULT_KEYS``), plus
the fingerprint of the loaded data and, for what is computed on a base model, the checkpoint's hash. A
setting added to a section keys every entry of the stages reading it, unless it is named here."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rift_bn import cache
from rift_bn.config import CORRUPTION_KEYS, NON_RESULT_KEYS, unused_corruption_keys

# (sections read, settings of them that change none of the numbers) per cache entry
BASE_SECTIONS = ("seed", "data", "model", "at", "attack", "trainer", "eval")
BASE_EXCLUDED = (
    "model.compile",  # speed only
    "model.channels_last",  # memory layout only
    "eval.batch_size",  # the validation that picks the best epoch counts images alike in any batching
    "eval.autoattack",  # the test report only
    *CORRUPTION_KEYS,  # the corruption evaluation only
)
ADVERSARIAL_SET_SECTIONS = ("seed", "data", "attack")
MRC_SECTIONS = ("seed", "data", "attack", "mrc")
MRC_EXCLUDED = ("mrc.exact_lowest",)  # one table per base: a bounded table is continued, not another
MRC_EXCLUDED_EXACT = ("mrc.linear_step",)  # the linear estimator's option
EVAL_SECTIONS = ("seed", "data", "attack", "eval")
EVAL_EXCLUDED = {
    "val": ("eval.batch_size", "eval.autoattack", *CORRUPTION_KEYS),
    "test": ("eval.batch_size", "data.val_size", "data.train_subset", *CORRUPTION_KEYS),  # nor the test split
}
CORRUPTION_EXCLUDED = ("eval.batch_size", "eval.autoattack")


def _without(plain: dict[str, Any], dotted: Iterable[str]) -> dict[str, Any]:
    """``plain`` (nested dicts) without the ``dotted`` keys, in place."""
    for key in dotted:
        *parents, leaf = key.split(".")
        node: Any = plain
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return plain


def settings(cfg: DictConfig, sections: Iterable[str], excluded: Iterable[str] = ()) -> dict[str, Any]:
    """The resolved ``sections`` of ``cfg`` without ``excluded`` and the settings that change no number."""
    plain = {
        s: OmegaConf.to_container(v, resolve=True) if isinstance(v := cfg[s], DictConfig) else v
        for s in sections
    }
    return _without(plain, (*NON_RESULT_KEYS, *excluded))


def job_key(cfg: DictConfig, data_fingerprint: str) -> str:
    """Identity of a job's results: the resolved config without the settings that change no number,
    and the fingerprint of the images and labels the job loaded (another copy at the same path, a subset
    or one changed file gives another key). With ``eval.corruptions=false`` the other corruption settings
    change nothing either, and none of them is part of the key (a job's key from before they existed)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain = _without(plain, (*NON_RESULT_KEYS, *unused_corruption_keys(cfg)))  # type: ignore[arg-type]
    return cache.digest(plain | {"data_fingerprint": data_fingerprint}, 24)


@dataclass(frozen=True)
class CacheKeys:
    """Where the cache entries of a job (``cfg`` on data of ``fingerprint``) live in ``cache_dir``. The base
    model is also keyed by the device type and the training processes (DDP: synchronised BN statistics,
    another float order)."""

    cfg: DictConfig
    fingerprint: str
    cache_dir: Path
    device_type: str = "cpu"
    processes: int = 1

    def _digest(self, sections: Iterable[str], excluded: Iterable[str] = (), **extra: Any) -> str:
        return cache.digest(
            {**settings(self.cfg, sections, excluded), "data_fingerprint": self.fingerprint, **extra}
        )

    def base_path(self) -> Path:
        """The cached base model trained with these settings."""
        c = self.cfg
        key = self._digest(BASE_SECTIONS, BASE_EXCLUDED, processes=self.processes, device=self.device_type)
        return (
            self.cache_dir / "base" / f"{c.data.name}-{c.model.name}-w{c.model.width}-seed{c.seed}-{key}.pt"
        )

    def adversarial_set_path(self, ckpt_hash: str, n: int) -> Path:
        """The first ``n`` selection-split examples attacked on the base ``ckpt_hash``."""
        key = self._digest(ADVERSARIAL_SET_SECTIONS, ckpt=ckpt_hash, n=n)
        return self.cache_dir / "adv" / f"{ckpt_hash[:16]}-{key}.pt"

    def mrc_path(self, ckpt_hash: str) -> Path:
        """Base ``ckpt_hash``'s MRC table: one per estimator, protocol, split and attack."""
        estimator = self.cfg.mrc.estimator
        excluded = MRC_EXCLUDED + (() if estimator == "linear" else MRC_EXCLUDED_EXACT)
        key = self._digest(MRC_SECTIONS, excluded, ckpt=ckpt_hash)
        return self.cache_dir / "mrc" / f"{ckpt_hash[:16]}-{estimator}-{key}.json"

    def corruption_path(self, ckpt_hash: str, files: str) -> Path:
        """Base ``ckpt_hash``'s corruption evaluation (``eval.corruptions*``) of the corruption files
        identified by ``files``."""
        key = self._digest(EVAL_SECTIONS, CORRUPTION_EXCLUDED, ckpt=ckpt_hash, files=files)
        return self.cache_dir / "eval" / f"{ckpt_hash[:16]}-corruptions-{key}.json"

    def eval_path(self, ckpt_hash: str, split: str) -> Path:
        """Base ``ckpt_hash``'s evaluation on ``split``: ``val`` (selection) or ``test``."""
        key = self._digest(EVAL_SECTIONS, EVAL_EXCLUDED[split], ckpt=ckpt_hash)
        return self.cache_dir / "eval" / f"{ckpt_hash[:16]}-{split}-{key}.json"
