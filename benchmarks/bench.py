"""Performance ratios, measured in one process on one model and batch: ``python -m benchmarks.bench``.

Every number is a ratio of two ways of doing the same work, timed in interleaved repetitions (the
order rotates each round) and summarised by a median (PGD: of the per-round ratios), so that load
from other processes on the machine affects both sides alike. Printed as a table and written as JSON
(``--json``). One intra-op thread by default (``--threads 0``: torch's default); ``--device cuda``
times a GPU (synchronised).

Attacks are the pipeline's (``conf/attack``, ``PGD.from_config``) with the part's number of steps, data the
pipeline's (``CIFARDataModule.from_config``).

- ``pgd_vs_torchattacks``: our PGD-10 / ``torchattacks.PGD`` on the same model, batch and random start;
  the adversarial images must be identical (``torch.equal``).
- ``pgd_vs_floor``: our PGD-10 / 10 x (forward + input-gradient backward) of the same model and batch.
- ``mrc_vs_reference``: ``rift_bn.mrc.compute_mrc`` / ``rift_bn.mrc.mrc_reference`` (the protocol as it
  reads) over all ``rift_bn`` candidates (conv, linear, bn), same inputs; ``mrc_max_rel_diff`` and
  ``mrc_same_ranking`` compare the values.
- ``mrc_bounded_vs_exact``: ``rift_bn.mrc.bounded_mrc`` with ``exact_lowest`` = 5 / ``compute_mrc`` (the full
  exact table), wall time, for the ``rift_bn`` candidates (``mrc_bounded_vs_exact_rift``: Conv/Linear),
  with RiFT's 10 epochs; the n lowest modules, their order and values must equal the full table's
  (``mrc_bounded_exact``) and every bound must lie at or below its module's MRC. Epochs of ascent run
  are reported beside the times. ``--bounded-checkpoint`` (with ``--data-root``) runs it on a trained
  base model's adversarial set (``rift_bn.mrc.adversarial_examples`` of its selection split, as the
  pipeline makes it) instead of the random model.
- ``at_step_vs_plain``: one adversarial-training step through ``AdversarialTraining`` and a Lightning
  ``Trainer`` / a plain PyTorch loop doing the same work (augmentation, the same PGD, SGD); per-step
  times between consecutive steps, Trainer start-up excluded.

``--quick`` runs the same at tiny size (for tests). See ``docs/performance.md`` for measured numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from benchmarks.common import clock, job_config, sync, trained_base
from rift_bn.attacks import PGD, attack_mode
from rift_bn.errors import UserError
from rift_bn.models import build_model, candidate_modules
from rift_bn.mrc import KINDS, MRCProtocol, adversarial_examples, bounded_mrc, compute_mrc, mrc_reference

TARGETS = {
    "pgd_vs_torchattacks": 0.9,
    "pgd_vs_floor": 1.05,
    "mrc_vs_reference": 0.2,
    "mrc_bounded_vs_exact": 0.35,
    "at_step_vs_plain": 1.10,
}


@dataclass
class BenchConfig:
    """Sizes of one benchmark run (the defaults are the quoted run; ``quick()`` the test size)."""

    model: str = "resnet18"
    width: int = 16
    batch: int = 128
    pgd_steps: int = 10
    reps: int = 7
    mrc_width: int = 16
    mrc_examples: int = 128
    mrc_batch: int = 64
    mrc_epochs: int = 4
    bounded_n: int = 5  # mrc_bounded_vs_exact: exact_lowest
    bounded_epochs: int = 10  # RiFT's
    bounded_steps: int = 2  # ascent steps per epoch (RiFT: 20; 2 = one pass over mrc_examples)
    bounded_checkpoint: str = ""  # a trained base (state_dict) instead of the random model; needs data_root
    data_root: str = ""
    dataset: str = "cifar10"
    val_size: int = 500  # the selection split of --bounded-checkpoint's run (scale=cpu: 500)
    at_steps: int = 3
    at_rounds: int = 2
    at_pgd_steps: int = 10
    seed: int = 0
    threads: int = 1  # 0: torch's default; one thread is faster and far steadier on a shared 2-core machine
    device: str = "cpu"

    @classmethod
    def quick(cls) -> BenchConfig:
        return cls(
            width=4,
            batch=16,
            pgd_steps=10,
            reps=2,
            mrc_width=4,
            mrc_examples=32,
            mrc_batch=16,
            mrc_epochs=2,
            bounded_steps=2,
            at_steps=2,
            at_rounds=1,
            at_pgd_steps=2,
        )


def job(cfg: BenchConfig) -> DictConfig:
    """The pipeline's config for this run's settings: data (``--dataset``, ``--data-root``, ``--val-size``,
    ``--seed``; nothing downloaded) and the base model of ``--bounded-checkpoint`` (``--model``,
    ``--mrc-width``); the attacks are its ``attack``."""
    values: dict[str, Any] = {
        "seed": cfg.seed,
        "data.val_size": cfg.val_size,
        "data.download": False,
        "model.width": cfg.mrc_width,
    }
    if cfg.data_root:
        values["data.root"] = cfg.data_root
    return job_config([f"data={cfg.dataset}", f"model={cfg.model}"], values)


def attack(cfg: BenchConfig, steps: int) -> PGD:
    """The pipeline's evaluation attack (``job(cfg).attack`` through ``PGD.from_config``), ``steps`` steps."""
    return PGD.from_config(OmegaConf.merge(job(cfg).attack, {"steps": steps}))


def _interleaved_times(
    fns: dict[str, Callable[[], Any]], reps: int, device: torch.device
) -> dict[str, list[float]]:
    """Run each function ``reps`` times, interleaved, rotating the order every round."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            fns[n]()
            sync(device)
            times[n].append(time.perf_counter() - t0)
    return times


def _med(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def _paired(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of ``a / b`` (the two ran back to back, under the same load)."""
    return _med([x / y for x, y in zip(times[a], times[b], strict=True)])


# --------------------------------------------------------------------------------------------- PGD


def bench_pgd(cfg: BenchConfig) -> dict[str, Any]:
    """Our PGD vs torchattacks.PGD (same images) and vs the forward/backward floor."""
    import torchattacks

    torch.manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    model = build_model(cfg.model, 10, cfg.width).eval().to(dev)
    x, y = torch.rand(cfg.batch, 3, 32, 32).to(dev), torch.randint(0, 10, (cfg.batch,)).to(dev)
    ours = attack(cfg, cfg.pgd_steps)
    theirs = torchattacks.PGD(
        model, eps=ours.eps, alpha=ours.alpha, steps=ours.steps, random_start=ours.random_start
    )

    def run_ours() -> Tensor:
        torch.manual_seed(cfg.seed + 1)
        return ours(model, x, y)

    def run_theirs() -> Tensor:
        torch.manual_seed(cfg.seed + 1)
        return theirs(x, y)

    def floor() -> None:
        with attack_mode(model):
            leaf = x.clone().requires_grad_(True)
            for _ in range(cfg.pgd_steps):  # what PGD-k must do: k forwards, k input-gradient backwards
                torch.autograd.grad(F.cross_entropy(model(leaf), y), leaf)

    # model.channels_last=true: faster convolutions on CPU, but other float rounding, hence other images
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def run_ours_cl() -> Tensor:
        torch.manual_seed(cfg.seed + 1)
        return ours(cl_model, x_cl, y)

    a, b = run_ours(), run_theirs()  # also the warm-up
    floor()
    a_cl = run_ours_cl()
    torch.manual_seed(cfg.seed + 1)
    b_cl = torchattacks.PGD(
        cl_model, eps=ours.eps, alpha=ours.alpha, steps=ours.steps, random_start=ours.random_start
    )(x_cl, y)
    identical = bool(torch.equal(a, b))
    in_ball = bool((a - x).abs().max() <= ours.eps + 1e-7 and a.min() >= 0 and a.max() <= 1)
    fns = {"ours": run_ours, "torchattacks": run_theirs, "floor": floor, "ours_channels_last": run_ours_cl}
    times = _interleaved_times(fns, cfg.reps, dev)
    med = {k: _med(v) for k, v in times.items()}
    return {
        "identical": identical,
        "in_ball": in_ball,
        "seconds": med,
        "times": times,
        "pgd_vs_torchattacks": _paired(times, "ours", "torchattacks"),
        "pgd_vs_floor": _paired(times, "ours", "floor"),
        "channels_last": {
            "vs_torchattacks": _paired(times, "ours_channels_last", "torchattacks"),
            "identical_to_torchattacks_nchw": bool(torch.equal(a_cl, b)),
            "identical_to_torchattacks_same_model": bool(torch.equal(a_cl, b_cl)),
            "pixels_differing_from_nchw": int((a_cl != b).sum()),
        },
    }


# --------------------------------------------------------------------------------------------- MRC


def mrc_model(arch: str, width: int, seed: int) -> nn.Module:
    """A random network whose MRC values are well above float noise: BatchNorm statistics of random
    images (so that eval-mode activations are normalised), random BN affine parameters, and a scaled
    classifier (confident logits, as after training)."""
    g = torch.Generator().manual_seed(seed)
    model = build_model(arch, 10, width)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = None  # cumulative average over the calibration batches
        bn.reset_running_stats()
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(64, 3, 32, 32, generator=g))
        for bn in bns:
            bn.momentum = 0.1
            bn.weight.copy_(torch.empty_like(bn.weight).uniform_(0.5, 1.5, generator=g))
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=g) * 0.1)
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(4.0)
    return model.eval()


def _groups(names: Sequence[str], min_size: int = 3) -> list[list[str]]:
    """Candidates grouped by top-level module (layer1, layer2, ...), small groups merged into the next."""
    groups: list[tuple[str, list[str]]] = []
    for name in names:
        key = name.split(".")[0]
        if groups and groups[-1][0] == key:
            groups[-1][1].append(name)
        else:
            groups.append((key, [name]))
    merged: list[list[str]] = []
    for _, g in groups:
        if merged and len(merged[-1]) < min_size:
            merged[-1] = merged[-1] + g
        else:
            merged.append(list(g))
    if len(merged) > 1 and len(merged[-1]) < min_size:
        last = merged.pop()
        merged[-1] = merged[-1] + last
    return merged


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b != 0 else abs(a - b)


def bench_mrc(cfg: BenchConfig) -> dict[str, Any]:
    """compute_mrc vs mrc_reference on all rift_bn candidates, interleaved group by group."""
    torch.manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    model = mrc_model(cfg.model, cfg.mrc_width, cfg.seed).to(dev)
    x = torch.rand(cfg.mrc_examples, 3, 32, 32).to(dev)
    y = torch.randint(0, 10, (cfg.mrc_examples,)).to(dev)
    kinds = KINDS["rift_bn"]
    proto = MRCProtocol(  # one in-order pass per epoch, as the ratios in docs/performance.md were measured
        epochs=cfg.mrc_epochs, batch_size=cfg.mrc_batch, seed=cfg.seed, shuffle=False, steps_per_epoch=None
    )
    names = [n for n, _, _ in candidate_modules(model, set(kinds))]
    fast_rows: dict[str, dict] = {}
    ref_rows: dict[str, dict] = {}
    seconds = {"fast": 0.0, "reference": 0.0}
    per_group = []
    for i, group in enumerate(_groups(names)):
        runs = {
            "fast": lambda g=group: compute_mrc(model, x, y, kinds, proto, names=g),
            "reference": lambda g=group: mrc_reference(model, x, y, kinds, proto, names=g),
        }
        t = {}
        for key in ["fast", "reference"] if i % 2 == 0 else ["reference", "fast"]:
            sync(dev)
            t0 = time.perf_counter()
            out = runs[key]()
            sync(dev)
            t[key] = time.perf_counter() - t0
            (fast_rows if key == "fast" else ref_rows).update({r["name"]: r for r in out["rows"]})
        seconds = {k: seconds[k] + t[k] for k in seconds}
        per_group.append({"modules": len(group), "first": group[0], **t})
    diffs = {n: rel_diff(fast_rows[n]["mrc"], ref_rows[n]["mrc"]) for n in names}
    rank_fast = sorted(names, key=lambda n: fast_rows[n]["mrc"])
    rank_ref = sorted(names, key=lambda n: ref_rows[n]["mrc"])
    mrcs = [abs(ref_rows[n]["mrc"]) for n in names]
    return {
        "candidates": len(names),
        "seconds": seconds,
        "groups": per_group,
        "mrc_vs_reference": seconds["fast"] / seconds["reference"],
        "mrc_max_rel_diff": max(diffs.values()),
        "worst_module": max(diffs, key=diffs.get),
        "mrc_same_ranking": rank_fast == rank_ref,
        "same_drop": all(fast_rows[n]["robust_acc_drop"] == ref_rows[n]["robust_acc_drop"] for n in names),
        "mrc_range": [min(mrcs), max(mrcs)],
        "protocol": asdict(proto),
    }


def _bounded_inputs(cfg: BenchConfig, dev: torch.device) -> tuple[nn.Module, Tensor, Tensor, str]:
    """The model and MRC set of ``bench_bounded``: the random bench model on random images, or a trained
    base on the adversarial set of its selection split, made as the pipeline makes it."""
    if not cfg.bounded_checkpoint:
        torch.manual_seed(cfg.seed)
        model = mrc_model(cfg.model, cfg.mrc_width, cfg.seed).to(dev)
        x = torch.rand(cfg.mrc_examples, 3, 32, 32).to(dev)
        y = torch.randint(0, 10, (cfg.mrc_examples,)).to(dev)
        return model, x, y, f"random {cfg.model} w{cfg.mrc_width}, {cfg.mrc_examples} random images"
    if not cfg.data_root:
        raise UserError(
            f"--bounded-checkpoint={cfg.bounded_checkpoint}: needs --data-root; pass the CIFAR folder of "
            "the base's run"
        )
    j = job(cfg)
    model, dm = trained_base(cfg.bounded_checkpoint, j, dev)
    pgd = PGD.from_config(j.attack)
    x = adversarial_examples(model, dm.val_x, dm.val_y, pgd, j.eval.batch_size, dev, j.seed).to(dev)
    y = dm.val_y.to(dev)
    return model, x, y, f"{cfg.bounded_checkpoint}, {len(y)} PGD-{pgd.steps} examples of the selection split"


def bench_bounded(cfg: BenchConfig) -> dict[str, Any]:
    """bounded_mrc (exact_lowest = ``bounded_n``) vs compute_mrc (every module exact), per candidate set:
    wall and CPU seconds, epochs of ascent, and that the bounded table agrees with the full one."""
    dev = torch.device(cfg.device)
    model, x, y, what = _bounded_inputs(cfg, dev)
    proto = MRCProtocol(
        epochs=cfg.bounded_epochs, batch_size=cfg.mrc_batch, seed=cfg.seed, steps_per_epoch=cfg.bounded_steps
    )
    n = cfg.bounded_n
    out: dict[str, Any] = {"inputs": what, "n": n, "protocol": asdict(proto)}
    for r, method in enumerate(("rift_bn", "rift")):
        kinds = KINDS[method]
        t: dict[str, tuple[float, float]] = {}
        res: dict[str, dict] = {}
        for key in ("full", "bounded") if r % 2 == 0 else ("bounded", "full"):
            w0, c0 = clock(dev)
            if key == "full":
                res[key] = compute_mrc(model, x, y, kinds, proto)
            else:
                res[key] = bounded_mrc(model, x, y, kinds, proto, n)
            w1, c1 = clock(dev)
            t[key] = (w1 - w0, c1 - c0)
        full, bounded = res["full"]["rows"], res["bounded"]["rows"]
        rank = sorted(range(len(full)), key=lambda i: (full[i]["mrc"], i))[:n]
        got = sorted(range(len(bounded)), key=lambda i: (bounded[i]["mrc"], i))[:n]
        stats = res["bounded"]["stats"]
        out[method] = {
            "candidates": len(full),
            "seconds": {k: v[0] for k, v in t.items()},
            "cpu_seconds": {k: v[1] for k, v in t.items()},
            "epochs": {"full": len(full) * proto.epochs, "bounded": stats["epochs"]},
            "exact_rows": sum(row["status"] == "exact" for row in bounded),
            "loads": stats["loads"],
            "load_seconds": stats["load_seconds"],
            "stage_input_bytes": stats["stage_input_bytes"],
            "ratio": t["bounded"][0] / t["full"][0],
            "cpu_ratio": t["bounded"][1] / t["full"][1],
            "epoch_ratio": stats["epochs"] / (len(full) * proto.epochs),
            "exact": got == rank and all(bounded[i] == full[i] for i in rank),
            "bounds_below": all(b["mrc"] <= f["mrc"] for b, f in zip(bounded, full, strict=True)),
        }
    out["mrc_bounded_vs_exact"] = out["rift_bn"]["ratio"]
    out["mrc_bounded_vs_exact_rift"] = out["rift"]["ratio"]
    out["mrc_bounded_exact"] = all(out[m]["exact"] and out[m]["bounds_below"] for m in ("rift_bn", "rift"))
    return out


# -------------------------------------------------------------------------------------- AT step


@contextlib.contextmanager
def _lightning_quiet() -> Iterator[None]:
    """Lightning's start-up banners and warnings off, restored afterwards."""
    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def bench_at(cfg: BenchConfig) -> dict[str, Any]:
    """One AT step: AdversarialTraining under a Lightning Trainer vs a plain loop with the same work."""
    import lightning as L

    from rift_bn.data import TensorLoader, augment, to_float
    from rift_bn.modules import AdversarialTraining, quiet_trainer

    dev = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    init = build_model(cfg.model, 10, cfg.width)
    n_batches = cfg.at_steps + 1  # the first step is a warm-up, not timed
    xs = torch.randint(0, 256, (n_batches * cfg.batch, 3, 32, 32), dtype=torch.uint8)
    ys = torch.randint(0, 10, (n_batches * cfg.batch,))
    pgd = attack(cfg, cfg.at_pgd_steps)
    sgd = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}

    class Ticks(L.Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_batch_end(self, *args: Any) -> None:
            sync(dev)
            self.ends.append(time.perf_counter())

    def lightning_steps() -> list[float]:
        module = AdversarialTraining(copy.deepcopy(init), pgd, pgd, 10, **sgd)
        ticks = Ticks()
        trainer = quiet_trainer(
            accelerator="cpu" if dev.type == "cpu" else "gpu",
            devices=[dev.index or 0] if dev.type == "cuda" else 1,
            max_epochs=1,
            callbacks=[ticks],
            limit_val_batches=0,
        )
        trainer.fit(module, train_dataloaders=TensorLoader(xs, ys, cfg.batch))
        return [b - a for a, b in zip(ticks.ends, ticks.ends[1:], strict=False)]

    def plain_steps() -> list[float]:
        model = copy.deepcopy(init).train().to(dev)
        opt = torch.optim.SGD(model.parameters(), **sgd)
        ends = []
        for xb, yb in TensorLoader(xs, ys, cfg.batch):
            xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
            x = augment(to_float(xb))
            x_adv = pgd(model, x, yb)
            loss = F.cross_entropy(model(x_adv), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync(dev)
            ends.append(time.perf_counter())
        return [b - a for a, b in zip(ends, ends[1:], strict=False)]

    steps: dict[str, list[float]] = {"lightning": [], "plain": []}
    with _lightning_quiet():
        for r in range(cfg.at_rounds):
            for key in ["lightning", "plain"] if r % 2 == 0 else ["plain", "lightning"]:
                steps[key] += (lightning_steps if key == "lightning" else plain_steps)()
    med = {k: _med(v) for k, v in steps.items()}
    return {"seconds_per_step": med, "steps": steps, "at_step_vs_plain": med["lightning"] / med["plain"]}


# ------------------------------------------------------------------------------------------ driver


def machine(device: str = "cpu") -> dict[str, Any]:
    """Where the numbers come from (CPU model, threads, torch version, load)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    dev = torch.device(device)
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available(),
        "load_avg": list(os.getloadavg()),
    }


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run(
    cfg: BenchConfig,
    parts: Sequence[str] = ("pgd", "mrc", "bounded", "at"),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the chosen parts; returns the JSON-ready result (ratios at the top level)."""
    with _threads(cfg.threads):
        out: dict[str, Any] = {"machine": machine(cfg.device), "config": asdict(cfg), "targets": TARGETS}
        t0 = time.perf_counter()
        if "pgd" in parts:
            log(f"pgd: {cfg.model} w{cfg.width}, batch {cfg.batch}, PGD-{cfg.pgd_steps}, {cfg.reps} reps ...")
            out["pgd"] = bench_pgd(cfg)
            out["pgd_vs_torchattacks"] = out["pgd"]["pgd_vs_torchattacks"]
            out["pgd_vs_floor"] = out["pgd"]["pgd_vs_floor"]
        if "mrc" in parts:
            log(
                f"mrc: {cfg.model} w{cfg.mrc_width}, {cfg.mrc_examples} examples, batch {cfg.mrc_batch}, "
                f"{cfg.mrc_epochs} epochs, fast vs reference ..."
            )
            out["mrc"] = bench_mrc(cfg)
            for k in ("mrc_vs_reference", "mrc_max_rel_diff", "mrc_same_ranking"):
                out[k] = out["mrc"][k]
        if "bounded" in parts:
            log(
                f"bounded: exact_lowest={cfg.bounded_n} vs every module exact, {cfg.bounded_epochs} epochs x "
                f"{cfg.bounded_steps} steps, batch {cfg.mrc_batch}, rift_bn and rift ..."
            )
            out["bounded"] = bench_bounded(cfg)
            for k in ("mrc_bounded_vs_exact", "mrc_bounded_vs_exact_rift", "mrc_bounded_exact"):
                out[k] = out["bounded"][k]
        if "at" in parts:
            log(
                f"at: {cfg.model} w{cfg.width}, batch {cfg.batch}, PGD-{cfg.at_pgd_steps}, "
                f"{cfg.at_rounds} x {cfg.at_steps} timed steps each ..."
            )
            out["at"] = bench_at(cfg)
            out["at_step_vs_plain"] = out["at"]["at_step_vs_plain"]
        out["met"] = {k: out[k] <= v for k, v in TARGETS.items() if k in out}
        out["machine"]["load_avg_end"] = list(os.getloadavg())
        out["wall_seconds"] = time.perf_counter() - t0
    return out


def table(out: dict[str, Any]) -> str:
    """The human-readable summary."""
    m, c = out["machine"], out["config"]
    lines = [
        f"rift_bn bench: {c['model']}, device {m['device']} (CPU {m['cpu']}, {m['cores']} cores), "
        f"{m['threads']} threads, "
        f"torch {m['torch']}, load avg {m['load_avg'][0]:.1f} -> {m['load_avg_end'][0]:.1f}",
        f"{'ratio':22s} {'value':>8s} {'target':>8s}  {'met':5s} detail",
    ]

    def row(key: str, detail: str) -> None:
        if key in out:
            met = "yes" if out["met"][key] else "NO"
            lines.append(f"{key:22s} {out[key]:8.3f} {'<= ' + str(TARGETS[key]):>8s}  {met:5s} {detail}")

    if "pgd" in out:
        p, s = out["pgd"], out["pgd"]["seconds"]
        where = f"w{c['width']} batch {c['batch']} PGD-{c['pgd_steps']}"
        row(
            "pgd_vs_torchattacks",
            f"{s['ours']:.3f}s vs {s['torchattacks']:.3f}s; identical images: {p['identical']}; {where}",
        )
        row("pgd_vs_floor", f"{s['ours']:.3f}s vs floor {s['floor']:.3f}s")
        cl = p["channels_last"]
        lines.append(
            f"{'(channels_last model)':22s} {cl['vs_torchattacks']:8.3f} {'info':>8s}  {'':5s} "
            f"{s['ours_channels_last']:.3f}s vs torchattacks NCHW; identical images: "
            f"{cl['identical_to_torchattacks_nchw']} (vs torchattacks on the same channels_last model: "
            f"{cl['identical_to_torchattacks_same_model']})"
        )
    if "mrc" in out:
        r = out["mrc"]
        row(
            "mrc_vs_reference",
            f"{r['seconds']['fast']:.1f}s vs {r['seconds']['reference']:.1f}s; "
            f"{r['candidates']} modules, w{c['mrc_width']}, {c['mrc_examples']} ex, batch {c['mrc_batch']}, "
            f"{c['mrc_epochs']} epochs",
        )
        lines.append(
            f"{'mrc_max_rel_diff':22s} {r['mrc_max_rel_diff']:8.1e} {'<= 1e-4':>8s}  "
            f"{'yes' if r['mrc_max_rel_diff'] <= 1e-4 else 'NO':5s} same ranking: {r['mrc_same_ranking']}; "
            f"MRC range {r['mrc_range'][0]:.2e}..{r['mrc_range'][1]:.2e}"
        )
    if "bounded" in out:
        b = out["bounded"]
        for method, key in (("rift_bn", "mrc_bounded_vs_exact"), ("rift", "mrc_bounded_vs_exact_rift")):
            r = b[method]
            s, e = r["seconds"], r["epochs"]
            detail = (
                f"{s['bounded']:.1f}s vs {s['full']:.1f}s (CPU {r['cpu_ratio']:.3f}); "
                f"epochs {e['bounded']} vs {e['full']} ({r['epoch_ratio']:.3f}); "
                f"{r['candidates']} {method} modules, {r['exact_rows']} exact, "
                f"{r['loads']} loads {r['load_seconds']:.1f}s"
            )
            if key in TARGETS:
                row(key, detail)
            else:
                lines.append(f"{key:22s} {out[key]:8.3f} {'info':>8s}  {'':5s} {detail}")
        lines.append(
            f"{'mrc_bounded_exact':22s} {str(b['mrc_bounded_exact']):>8s} {'True':>8s}  "
            f"{'yes' if b['mrc_bounded_exact'] else 'NO':5s} n={b['n']} lowest, order and values equal the "
            f"full table's; bounds <= MRC; {b['inputs']}"
        )
    if "at" in out:
        a = out["at"]["seconds_per_step"]
        row(
            "at_step_vs_plain",
            f"{a['lightning']:.3f}s vs {a['plain']:.3f}s per step; w{c['width']} "
            f"batch {c['batch']} PGD-{c['at_pgd_steps']}",
        )
    lines.append(f"total {out['wall_seconds']:.0f}s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds; for tests)")
    parser.add_argument("--json", type=Path, default=Path("bench.json"), help="where to write the results")
    parser.add_argument(
        "--parts", default="pgd,mrc,bounded,at", help="comma-separated subset of pgd,mrc,bounded,at"
    )
    for f, v in asdict(BenchConfig()).items():
        parser.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=None, help=f"default {v}")
    args = parser.parse_args(argv)
    cfg = BenchConfig.quick() if args.quick else BenchConfig()
    for f in asdict(cfg):
        if getattr(args, f, None) is not None:
            setattr(cfg, f, getattr(args, f))
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    out = run(cfg, parts, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(table(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
        print(f"written: {args.json}")
    return out


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
