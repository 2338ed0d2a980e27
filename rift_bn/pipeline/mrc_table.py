"""Stage 2, the MRC table: PGD examples of the selection split on the base model, and every candidate's
MRC on them, each computed once per base model and protocol and shared through the cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from rift_bn import cache
from rift_bn.attacks import PGD
from rift_bn.models import candidate_modules
from rift_bn.mrc import (
    LOWER_BOUND,
    ModuleState,
    MRCProtocol,
    adversarial_examples,
    bounded_mrc,
    compute_mrc,
    lowest_proven,
    row_status,
)
from rift_bn.pipeline.keys import CacheKeys
from rift_bn.pipeline.training import Timings
from rift_bn.seeds import SeedStream

Examples = tuple[Tensor, Tensor]


def protocol(mcfg: DictConfig, seed: int) -> MRCProtocol:
    """The ``mrc`` group's protocol; its batch order runs on the job's own stream."""
    return MRCProtocol(
        epsilon=mcfg.epsilon,
        epochs=mcfg.epochs,
        lr=mcfg.lr,
        batch_size=mcfg.batch_size,
        shuffle=mcfg.shuffle,
        seed=SeedStream.JOB.of(seed),
        steps_per_epoch=mcfg.steps_per_epoch,
    )


def exact_lowest(mcfg: DictConfig, k: int) -> int | None:
    """How many lowest MRCs the exact estimator must give exactly: ``mrc.exact_lowest`` raised to this
    job's ``k`` (a job whose k exceeds the cached exact rows extends them); None = every module."""
    n = mcfg.get("exact_lowest")
    return None if n is None else max(int(n), int(k))


def state_path(path: Path) -> Path:
    """The paused ascents of a table's ``lower_bound`` rows, beside its JSON."""
    return path.with_suffix(".state.pt")


def progress(name: str, done: int, total: int) -> None:
    print(f"  mrc {done}/{total}: {name}", flush=True)


def adversarial_set(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: PGD,
    batch_size: int,
    device: torch.device,
    seed: int,
    path: Path,
    lock: bool = True,
) -> Examples:
    """PGD examples of images ``x`` (labels ``y``) on ``model`` in eval mode, on the job ``seed``'s
    adversarial-set stream, read from ``path`` or made and written there once across processes; on
    ``device``."""

    def compute() -> dict[str, Tensor]:
        return {"x": adversarial_examples(model, x, y, attack, batch_size, device, seed), "y": y.clone()}

    data, _ = cache.cached(path, compute, cache.save_tensors, cache.load_tensors, lock=lock)
    return data["x"].to(device), data["y"].to(device)


def mrc_table(
    model: nn.Module,
    kinds: tuple[str, ...],
    mcfg: DictConfig,
    proto: MRCProtocol,
    lowest: int | None,
    path: Path,
    examples: Callable[[], Examples],
    timings: Timings,
    lock: bool = True,
) -> tuple[list[dict], str]:
    """MRC rows (``mrc.estimator``) of every candidate of ``kinds``, and whether the table was
    ``computed`` or read from the ``cache`` at ``path``. ``examples()`` gives the adversarial set; it is
    called only when rows are missing.

    With ``lowest`` (the exact estimator's :func:`exact_lowest`), the rows of modules that cannot be among
    the lowest are lower bounds (``status``), and their paused ascents are kept beside the table: a later
    job that needs more (a larger n or k, null, the other candidate set) continues them."""
    wanted = [n for n, _, _ in candidate_modules(model, set(kinds))]

    def known() -> dict:
        return cache.read_json(path) if path.exists() else {"rows": {}}

    def enough(table: dict) -> bool:
        rows = table["rows"]
        return all(n in rows for n in wanted) and lowest_proven([rows[n] for n in wanted], lowest)

    table = known()
    if enough(table):
        return [table["rows"][n] for n in wanted], "cache"
    with cache.locked(path, enabled=lock):
        table = known()
        if enough(table):
            return [table["rows"][n] for n in wanted], "cache"
        x, y = examples()
        with timings.timed("mrc"):
            if mcfg.estimator == "linear":
                from rift_bn.mrc_linear import linear_mrc

                missing = tuple(
                    k
                    for k in kinds
                    if any(n not in table["rows"] for n, _, _ in candidate_modules(model, {k}))
                )
                new = linear_mrc(
                    model, x, y, missing, proto, measure_step=bool(mcfg.get("linear_step", False))
                )
            else:
                new = _exact_rows(model, x, y, kinds, wanted, table["rows"], lowest, proto, state_path(path))
        table["rows"].update({r["name"]: r for r in new["rows"]})
        table |= {
            "base_loss": new["base_loss"],
            "base_robust_acc": new["base_robust_acc"],
            "estimator": mcfg.estimator,
            "protocol": proto.key(),
        }
        cache.write_json(path, table)
    return [table["rows"][n] for n in wanted], "computed"


def job_mrc_table(
    cfg: DictConfig,
    kinds: tuple[str, ...],
    model: nn.Module,
    ckpt_hash: str,
    selection: Examples,
    keys: CacheKeys,
    device: torch.device,
    timings: Timings,
    lock: bool = True,
) -> tuple[list[dict], str]:
    """:func:`mrc_table` of base ``model`` (``ckpt_hash``) as a job of ``cfg`` makes it: on PGD examples (the
    ``attack`` group) of the first ``mrc.num_examples`` images of the ``selection`` split (uint8 images,
    labels), in ``cfg``'s cache."""
    m = cfg.mrc
    x, y = selection
    n = m.num_examples or len(y)

    def examples() -> Examples:
        with timings.timed("adversarial_set"):
            path = keys.adversarial_set_path(ckpt_hash, n)
            attack, batch_size = PGD.from_config(cfg.attack), cfg.eval.batch_size
            return adversarial_set(model, x[:n], y[:n], attack, batch_size, device, cfg.seed, path, lock)

    proto, lowest = protocol(m, cfg.seed), exact_lowest(m, cfg.k) if m.estimator == "exact" else None
    return mrc_table(model, kinds, m, proto, lowest, keys.mrc_path(ckpt_hash), examples, timings, lock)


def _exact_rows(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    kinds: tuple[str, ...],
    wanted: list[str],
    rows: dict[str, dict],
    lowest: int | None,
    proto: MRCProtocol,
    states_path: Path,
) -> dict:
    """The exact rows ``mrc_table`` lacks: ``compute_mrc`` for the missing modules when every module is
    wanted exact and none is paused; else ``bounded_mrc``, continuing the paused ascents saved at
    ``states_path`` (a state that does not match its row restarts that module) and saving the new ones
    there, before the caller writes the table."""
    partial = [n for n in wanted if n in rows and row_status(rows[n]) == LOWER_BOUND]
    if lowest is None and not partial:
        missing = [n for n in wanted if n not in rows]
        return compute_mrc(model, x, y, kinds, proto, progress=progress, names=missing)
    saved = cache.load_tensors(states_path)["modules"] if states_path.exists() else {}
    states = {
        n: ModuleState.from_dict(saved[n])
        for n in partial
        if n in saved and saved[n]["epochs_run"] == rows[n]["epochs_run"]
    }
    exact = {n: rows[n] for n in wanted if n in rows and n not in partial}
    new = bounded_mrc(model, x, y, kinds, proto, lowest, exact, states, progress=progress)
    saved = {n: s for n, s in saved.items() if n not in wanted}
    saved |= {n: s.to_dict() for n, s in new["states"].items()}
    if saved:  # the states first, then (the caller) the table whose rows point to them
        cache.save_tensors(states_path, {"protocol": proto.key(), "modules": saved})
    else:
        states_path.unlink(missing_ok=True)
    return new
