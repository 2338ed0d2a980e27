"""Stage 6, distribution shift (``eval.corruptions``): the base and the final model on the common corruptions
of the test set (CIFAR-10-C / CIFAR-100-C, :mod:`rift_bn.data.corruptions`), after the test report.

Nothing is chosen on these images: the final model is fixed before they are read, and the record only
reports them. The base model's numbers are cached (``eval/<ckpt>-corruptions-<key>.json``: its checkpoint,
the data fingerprint, the ``eval``/``attack``/``seed`` settings and the identity of the corruption files),
so the jobs of a sweep measure it once. PGD on the corrupted images (``eval.corruptions_attack``) draws its
random starts from the stream ``CORRUPTION_EVAL``, the same for both models.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from rift_bn import cache
from rift_bn.attacks import PGD
from rift_bn.config import corruption_names
from rift_bn.data.corruptions import (
    SEVERITIES,
    CorruptionAccuracy,
    check_corruption_files,
    evaluate_corruptions,
)
from rift_bn.pipeline.keys import CacheKeys
from rift_bn.pipeline.training import Timings
from rift_bn.results import Corruptions
from rift_bn.seeds import SeedStream, seeded


def measure(cfg: DictConfig, model: nn.Module, device: torch.device) -> CorruptionAccuracy:
    """``model`` on the corruptions of ``eval.corruptions`` (every severity, the first
    ``eval.corruptions_subset`` images of each), as the job measures every model there."""
    e = cfg.eval
    attack = PGD.from_config(cfg.attack) if e.corruptions_attack else None
    with seeded(cfg.seed, SeedStream.CORRUPTION_EVAL):
        return evaluate_corruptions(
            model.to(device),
            cfg.data.root,
            cfg.data.name,
            corruption_names(e.corruptions),
            SEVERITIES,
            e.corruptions_subset,
            e.batch_size,
            device,
            e.precision,
            attack,
        )


def files_identity(cfg: DictConfig) -> str:
    """A digest of the size and modification time of every corruption file the job reads (a replaced file,
    another copy: another cache entry)."""
    names = corruption_names(cfg.eval.corruptions)
    folder = check_corruption_files(cfg.data.root, cfg.data.name, names)
    stats = {f"{name}.npy": (folder / f"{name}.npy").stat() for name in (*names, "labels")}
    return cache.digest({file: [st.st_size, st.st_mtime_ns] for file, st in stats.items()})


def _to_json(acc: CorruptionAccuracy) -> dict[str, Any]:
    return {"total": acc.total, "correct": acc.correct}


def _from_json(d: dict[str, Any]) -> CorruptionAccuracy:
    correct = {name: {int(s): c for s, c in by.items()} for name, by in d["correct"].items()}
    return CorruptionAccuracy(int(d["total"]), correct)


def corruption_record(
    base: CorruptionAccuracy, final: CorruptionAccuracy, metrics: tuple[str, ...]
) -> Corruptions:
    """The record's ``corruptions`` (:class:`rift_bn.results.Corruptions`): per model and metric the accuracy
    ``{corruption: {severity: percent}}`` (severities as the JSON keys ``"1"`` to ``"5"``), and the means over
    every corruption and severity."""

    def tables(acc: CorruptionAccuracy) -> dict[str, dict[str, dict[str, float]]]:
        return {m: {n: {str(s): v for s, v in by.items()} for n, by in acc.table(m).items()} for m in metrics}

    mean = {model: {m: acc.mean(m) for m in metrics} for model, acc in (("base", base), ("final", final))}
    mean["delta"] = {m: mean["final"][m] - mean["base"][m] for m in metrics}
    return Corruptions(images=base.total, base=tables(base), final=tables(final), mean=mean)


def report_corruptions(
    cfg: DictConfig,
    keys: CacheKeys,
    base: nn.Module,
    ckpt_hash: str,
    final: nn.Module,
    device: torch.device,
    timings: Timings,
) -> dict[str, Any]:
    """``{"corruptions": record}`` (:func:`corruption_record`) of the base (cached) and the final model
    (the base itself for ``stage=at``); ``{}`` with ``eval.corruptions=false``."""
    if not corruption_names(cfg.eval.corruptions):
        return {}
    with timings.timed("corruption_eval"):
        path = keys.corruption_path(ckpt_hash, files_identity(cfg))
        base_json, _ = cache.cached(
            path, lambda: _to_json(measure(cfg, base, device)), cache.write_json, cache.read_json
        )
        base_acc = _from_json(base_json)
        final_acc = base_acc if final is base else measure(cfg, final, device)
    metrics = ("clean_acc", "robust_acc") if cfg.eval.corruptions_attack else ("clean_acc",)
    record = corruption_record(base_acc, final_acc, metrics)
    mean = record["mean"]
    print(
        f"corruptions ({len(record['base']['clean_acc'])} x {len(SEVERITIES)} severities, "
        f"{record['images']} images each): clean base {mean['base']['clean_acc']:.2f}%, "
        f"final {mean['final']['clean_acc']:.2f}% ({mean['delta']['clean_acc']:+.2f})",
        flush=True,
    )
    return {"corruptions": record}
