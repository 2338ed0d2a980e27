"""Module robust criticality (MRC, Zhu et al. ICCV 2023), with BatchNorm layers as candidates.

For a candidate module M, starting from the base weights every time and changing only M, run plain
SGD gradient *ascent* on the cross-entropy over a fixed set of adversarial examples; after each
epoch project the change so that ||dW|| <= epsilon * ||W|| per parameter tensor, then measure the
loss over the whole set. MRC(M) = max over epochs of that loss - the base loss. The model stays in
eval mode throughout. Conv/Linear perturb ``weight``; BatchNorm perturbs ``weight`` and ``bias``.

``compute_mrc`` is the fast, exact implementation: the input of the network stage that holds M is
computed once per stage (nothing before it changes), every ascent step runs forward and backward
from that stage only, and gradients are taken for M's parameters alone. ``mrc_reference`` is the
protocol as it reads (a model copy per module, full forward and backward), kept as the oracle for
tests and the benchmark.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rift_bn.models import candidate_modules

KINDS = {"rift": ("conv", "linear"), "rift_bn": ("conv", "linear", "bn")}


@dataclass(frozen=True)
class MRCProtocol:
    """Every number of the MRC protocol (DESIGN step 5); part of the cache key."""

    epsilon: float = 0.1
    epochs: int = 10
    lr: float = 1.0
    batch_size: int = 512
    shuffle: bool = False
    seed: int = 0
    eval_batch_size: int = 1024

    def key(self) -> dict:
        d = asdict(self)
        d.pop("eval_batch_size")  # changes nothing but speed
        return d


def perturbed_params(module: nn.Module, kind: str) -> list[nn.Parameter]:
    """The tensors MRC perturbs: ``weight`` for Conv/Linear, ``weight`` and ``bias`` for BatchNorm."""
    names = ("weight", "bias") if kind == "bn" else ("weight",)
    return [getattr(module, n) for n in names if getattr(module, n, None) is not None]


@torch.no_grad()
def project_(params: Sequence[Tensor], originals: Sequence[Tensor], epsilon: float) -> None:
    """In place: scale each change so that ||p - p0|| <= epsilon * ||p0|| (Frobenius, per tensor)."""
    for p, p0 in zip(params, originals, strict=True):
        diff = p - p0
        norm, bound = diff.norm(), epsilon * p0.norm()
        if norm > bound:
            p.copy_(p0 + diff * (bound / norm))


def _batches(n: int, batch_size: int, shuffle: bool, generator: torch.Generator) -> list[Tensor]:
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    return list(order.split(batch_size))


@torch.no_grad()
def _loss_and_acc(forward: Callable[[Tensor], Tensor], h: Tensor, y: Tensor, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy (float64 accumulation) and accuracy (percent) over the whole set."""
    total, correct = torch.zeros((), dtype=torch.float64, device=y.device), 0
    for i in range(0, len(y), batch_size):
        logits = forward(h[i:i + batch_size])
        total += F.cross_entropy(logits.float(), y[i:i + batch_size], reduction="sum").double()
        correct += int((logits.argmax(1) == y[i:i + batch_size]).sum())
    return total.item() / len(y), 100.0 * correct / len(y)


def _ascent(
    name: str, params: list[nn.Parameter], forward: Callable[[Tensor], Tensor], h: Tensor, y: Tensor,
    proto: MRCProtocol, base_loss: float, base_acc: float,
) -> dict[str, float]:
    """Gradient ascent on ``params`` only, projection per epoch; restores the parameters afterwards."""
    originals = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(proto.seed)
    best_loss, best_acc, best_epoch = -math.inf, base_acc, 0
    try:
        for epoch in range(1, proto.epochs + 1):
            for idx in _batches(len(y), proto.batch_size, proto.shuffle, generator):
                idx = idx.to(y.device)
                with torch.enable_grad():
                    loss = F.cross_entropy(forward(h[idx]), y[idx])
                    grads = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    for p, g in zip(params, grads, strict=True):
                        p.add_(g, alpha=proto.lr)  # ascent: plain SGD on -loss
            project_(params, originals, proto.epsilon)
            loss_e, acc_e = _loss_and_acc(forward, h, y, proto.eval_batch_size)
            if not math.isfinite(loss_e):
                raise FloatingPointError(f"mrc: loss is {loss_e} for module {name} at epoch {epoch}; "
                                         "lower mrc.lr or mrc.epsilon")
            if loss_e > best_loss:
                best_loss, best_acc, best_epoch = loss_e, acc_e, epoch
    finally:
        with torch.no_grad():
            for p, p0 in zip(params, originals, strict=True):
                p.copy_(p0)
    return {"mrc": best_loss - base_loss, "robust_acc_drop": base_acc - best_acc, "epoch": best_epoch}


class _Frozen:
    """Context: eval mode and requires_grad=False for every parameter, restored on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self.model.eval()
        for p, _ in self.flags:
            p.requires_grad_(False)

    def __exit__(self, *exc: object) -> None:
        for p, f in self.flags:
            p.requires_grad_(f)
        for m, mode in self.modes:
            m.training = mode


def _compose(stages: Sequence[nn.Module]) -> Callable[[Tensor], Tensor]:
    def forward(h: Tensor) -> Tensor:
        for stage in stages:
            h = stage(h)
        return h

    return forward


def compute_mrc(
    model: nn.Module, x_adv: Tensor, y: Tensor, kinds: Sequence[str], proto: MRCProtocol,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """MRC of every candidate module of ``kinds``, fast path. Returns {'rows', 'base_loss', 'base_robust_acc'}."""
    candidates = candidate_modules(model, set(kinds))
    stages = list(model.stages())
    stage_of = {}
    for i, stage in enumerate(stages):
        for m in stage.modules():
            stage_of.setdefault(id(m), i)
    rows: dict[str, dict] = {}
    with _Frozen(model), torch.no_grad():
        base_loss, base_acc = _loss_and_acc(_compose(stages), x_adv, y, proto.eval_batch_size)
        h, done = x_adv, 0  # h: input of stage i for the whole set
        for i, stage in enumerate(stages):
            here = [(n, m, k) for n, m, k in candidates if stage_of[id(m)] == i]
            forward = _compose(stages[i:])
            for name, module, kind in here:
                params = perturbed_params(module, kind)
                for p in params:
                    p.requires_grad_(True)
                try:
                    rows[name] = {"name": name, "type": kind,
                                  **_ascent(name, params, forward, h, y, proto, base_loss, base_acc)}
                finally:
                    for p in params:
                        p.requires_grad_(False)
                done += 1
                if progress:
                    progress(name, done, len(candidates))
            if i + 1 < len(stages) and done < len(candidates):
                h = torch.cat([stage(h[j:j + proto.eval_batch_size]) for j in range(0, len(h), proto.eval_batch_size)])
    return {"rows": [rows[n] for n, _, _ in candidates], "base_loss": base_loss, "base_robust_acc": base_acc}


def mrc_reference(model: nn.Module, x_adv: Tensor, y: Tensor, kinds: Sequence[str], proto: MRCProtocol) -> dict:
    """The protocol as it reads: per module a fresh copy of the model, full forward and backward."""
    template = copy.deepcopy(model).eval()
    base_loss, base_acc = _loss_and_acc(template, x_adv, y, proto.eval_batch_size)
    rows = []
    for name, _, kind in candidate_modules(template, set(kinds)):
        net = copy.deepcopy(template)
        module = dict(net.net.named_modules())[name]
        params = perturbed_params(module, kind)
        for p in net.parameters():
            p.requires_grad_(any(p is q for q in params))
        rows.append({"name": name, "type": kind, **_ascent(name, params, net, x_adv, y, proto, base_loss, base_acc)})
    return {"rows": rows, "base_loss": base_loss, "base_robust_acc": base_acc}


def select_lowest(rows: Sequence[dict], kinds: Sequence[str], k: int) -> list[dict]:
    """The k candidates of ``kinds`` with the lowest MRC (ties keep network order)."""
    pool = [r for r in rows if r["type"] in kinds]
    if not 1 <= k <= len(pool):
        raise ValueError(f"k={k}: must lie between 1 and the number of candidates ({len(pool)} for "
                         f"{'+'.join(kinds)}); pick a smaller k")
    return sorted(pool, key=lambda r: r["mrc"])[:k]
