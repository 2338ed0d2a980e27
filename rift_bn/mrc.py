"""Module robust criticality (MRC, Zhu et al. ICCV 2023), with BatchNorm layers as candidates.

For a candidate module M, starting from the base weights every time and changing only M, run plain
SGD gradient *ascent* on the cross-entropy over a fixed set of adversarial examples, ``steps_per_epoch``
batches per epoch (RiFT's code: 10,000 examples in shuffled batches of 512, 20 steps; over a smaller set
the batches cycle through it, reshuffled each pass; ``None`` = one pass per epoch); after each
epoch project the change so that ||dW|| <= epsilon * ||W|| per parameter tensor, then measure the
loss over the whole set. MRC(M) = max over epochs of that loss - the base loss. The model stays in
eval mode throughout. Conv/Linear perturb ``weight``; BatchNorm perturbs ``weight`` and ``bias``.

``compute_mrc`` is the fast, exact implementation: nothing before a candidate changes, so the input
of its network stage is computed once per stage and, inside the stage (traced with torch.fx), so are
the values that do not depend on the candidate (e.g. a residual block's shortcut); every ascent step
runs forward and backward from the candidate on, with gradients for its parameters alone, and each
epoch's evaluation doubles as the next epoch's first forward. ``mrc_reference`` is the protocol as it
reads (a model copy per module, full forward and backward, a separate evaluation), kept as the oracle
for tests and the benchmark (``python -m rift_bn.bench``).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from rift_bn.models import candidate_modules, frozen

KINDS = {"rift": ("conv", "linear"), "rift_bn": ("conv", "linear", "bn")}


@dataclass(frozen=True)
class MRCProtocol:
    """Every number of the MRC protocol (DESIGN step 5); part of the cache key."""

    epsilon: float = 0.1
    epochs: int = 10
    lr: float = 1.0
    batch_size: int = 512
    shuffle: bool = True
    seed: int = 0
    steps_per_epoch: int | None = 20  # None: one pass over the set per epoch
    eval_batch_size: int = 1024

    def key(self) -> dict:
        d = asdict(self)
        d.pop("eval_batch_size")  # changes nothing but speed
        return d

    def steps(self, n: int) -> int:
        """Ascent steps per epoch over ``n`` examples: ``steps_per_epoch``, or one pass."""
        return self.steps_per_epoch if self.steps_per_epoch is not None else math.ceil(n / self.batch_size)


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


Index = slice | Tensor


def batch_stream(n: int, proto: MRCProtocol, device: torch.device | str = "cpu") -> Iterator[Index]:
    """The ascent's batches, endlessly: pass after pass over the ``n`` examples, each pass (with
    ``shuffle``) a fresh seeded permutation split into batches of ``batch_size`` (the last one smaller),
    as a shuffling DataLoader gives them; without ``shuffle`` slices in order (views, no copy). An epoch
    takes the next ``proto.steps(n)`` batches, so RiFT's 20 steps over a smaller set cycle through it."""
    generator = torch.Generator().manual_seed(proto.seed)
    while True:
        if proto.shuffle:
            yield from torch.randperm(n, generator=generator).to(device).split(proto.batch_size)
        else:
            yield from (slice(i, min(i + proto.batch_size, n)) for i in range(0, n, proto.batch_size))


def _epoch(stream: Iterator[Index], n: int, proto: MRCProtocol) -> list[Index]:
    return list(itertools.islice(stream, proto.steps(n)))


def _rest(first: Index, n: int, size: int, device: torch.device) -> list[Index]:
    """Chunks of every example outside batch ``first`` (the rest of an evaluation over the set)."""
    if isinstance(first, slice):
        return _chunks(slice(0, first.start), size) + _chunks(slice(first.stop, n), size)
    keep = torch.ones(n, dtype=torch.bool, device=device)
    keep[first] = False
    return _chunks(keep.nonzero().squeeze(1), size)


def _take(inputs: Sequence[Tensor], idx: Index) -> list[Tensor]:
    return [t[idx] for t in inputs]


def _chunks(idx: Index, size: int) -> list[Index]:
    if isinstance(idx, slice):
        return [slice(i, min(i + size, idx.stop)) for i in range(idx.start, idx.stop, size)]
    return list(idx.split(size)) if len(idx) else []


@torch.no_grad()
def _loss_and_acc(
    forward: Callable[[Tensor], Tensor], h: Tensor, y: Tensor, batch_size: int
) -> tuple[float, float]:
    """Mean cross-entropy (float64 accumulation) and accuracy (percent) over the whole set."""
    total, correct = _sums(lambda idx: forward(h[idx]), y, _chunks(slice(0, len(y)), batch_size))
    return total.item() / len(y), 100.0 * int(correct) / len(y)


def _ce_sum(logits: Tensor, y: Tensor) -> Tensor:
    """Summed cross-entropy in at least float32 (float64 stays float64)."""
    if logits.dtype != torch.float64:
        logits = logits.float()
    return F.cross_entropy(logits, y, reduction="sum")


def _sums(logits_of: Callable[[Index], Tensor], y: Tensor, chunks: Sequence[Index]) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy (float64) and number correct over ``chunks``, on the device (no sync)."""
    total = torch.zeros((), dtype=torch.float64, device=y.device)
    correct = torch.zeros((), dtype=torch.int64, device=y.device)
    for idx in chunks:
        logits = logits_of(idx)
        total += _ce_sum(logits, y[idx]).double()
        correct += (logits.argmax(1) == y[idx]).sum()
    return total, correct


def _result(best_loss: float, best_acc: float, best_epoch: int, base_loss: float, base_acc: float) -> dict:
    return {"mrc": best_loss - base_loss, "robust_acc_drop": base_acc - best_acc, "epoch": best_epoch}


def _check_finite(loss: float, name: str, epoch: int) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"mrc: loss is {loss} for module {name} at epoch {epoch}; lower mrc.lr or mrc.epsilon"
        )


def _ascent(
    name: str,
    params: list[nn.Parameter],
    forward: Callable[..., Tensor],
    inputs: Sequence[Tensor],
    y: Tensor,
    proto: MRCProtocol,
) -> tuple[float, float, int]:
    """Gradient ascent on ``params`` only, projection per epoch; restores the parameters afterwards.
    Returns the largest loss over the epochs, the accuracy then and that epoch.

    ``forward(*inputs[idx])`` gives the logits of examples ``idx``. Same steps and evaluations as the
    protocol, with one saving: the evaluation after an epoch runs the next epoch's first batch with its
    graph kept, and that graph gives the first ascent step of the next epoch (the parameters are the same
    in both), so that batch is not run forward twice.
    """
    n = len(y)
    originals = [p.detach().clone() for p in params]
    stream = batch_stream(n, proto, y.device)
    order = _epoch(stream, n, proto)
    pending: Tensor | None = None  # mean loss of order[0] at the current parameters, with its graph
    best_loss, best_acc, best_epoch = -math.inf, math.nan, 0
    try:
        for epoch in range(1, proto.epochs + 1):
            for b, idx in enumerate(order):
                with torch.enable_grad():
                    if b == 0 and pending is not None:
                        loss, pending = pending, None
                    else:
                        loss = F.cross_entropy(forward(*_take(inputs, idx)), y[idx])
                    grads = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    torch._foreach_add_(params, grads, alpha=proto.lr)  # ascent: plain SGD on -loss
            project_(params, originals, proto.epsilon)
            with torch.no_grad():
                rest: list[Index] = _chunks(slice(0, n), proto.eval_batch_size)
                total = torch.zeros((), dtype=torch.float64, device=y.device)
                correct = torch.zeros((), dtype=torch.int64, device=y.device)
                if epoch < proto.epochs:
                    order = _epoch(stream, n, proto)
                    first = order[0]
                    with torch.enable_grad():
                        logits = forward(*_take(inputs, first))
                        wide = logits if logits.dtype == torch.float64 else logits.float()  # as _ce_sum
                        ce = F.cross_entropy(wide, y[first], reduction="none")
                        pending = ce.mean()
                    total += ce.detach().double().sum()
                    correct += (logits.detach().argmax(1) == y[first]).sum()
                    rest = _rest(first, n, proto.eval_batch_size, y.device)
                t, c = _sums(lambda idx: forward(*_take(inputs, idx)), y, rest)
                loss_e, acc_e = (total + t).item() / n, 100.0 * int(correct + c) / n
            _check_finite(loss_e, name, epoch)
            if loss_e > best_loss:
                best_loss, best_acc, best_epoch = loss_e, acc_e, epoch
    finally:
        pending = None
        with torch.no_grad():
            for p, p0 in zip(params, originals, strict=True):
                p.copy_(p0)
    return best_loss, best_acc, best_epoch


def _ascent_reference(
    name: str,
    params: list[nn.Parameter],
    forward: Callable[[Tensor], Tensor],
    h: Tensor,
    y: Tensor,
    proto: MRCProtocol,
    base_loss: float,
    base_acc: float,
) -> dict[str, float]:
    """The protocol step by step, as the original RiFT code does it: per batch a full forward and a full
    ``backward()`` (every parameter requires grad), plain SGD on ``-loss`` over the module's tensors; per
    epoch projection, then an evaluation."""
    originals = [p.detach().clone() for p in params]
    stream = batch_stream(len(y), proto)
    optimizer = torch.optim.SGD(params, lr=proto.lr)
    best_loss, best_acc, best_epoch = -math.inf, base_acc, 0
    try:
        for epoch in range(1, proto.epochs + 1):
            for idx in itertools.islice(stream, proto.steps(len(y))):
                if isinstance(idx, Tensor):
                    idx = idx.to(y.device)
                (forward if isinstance(forward, nn.Module) else optimizer).zero_grad(set_to_none=True)
                with torch.enable_grad():
                    (-F.cross_entropy(forward(h[idx]), y[idx])).backward()
                optimizer.step()  # p - lr * grad(-loss): gradient ascent
            project_(params, originals, proto.epsilon)
            loss_e, acc_e = _loss_and_acc(forward, h, y, proto.eval_batch_size)
            _check_finite(loss_e, name, epoch)
            if loss_e > best_loss:
                best_loss, best_acc, best_epoch = loss_e, acc_e, epoch
    finally:
        with torch.no_grad():
            for p, p0 in zip(params, originals, strict=True):
                p.copy_(p0)
    return _result(best_loss, best_acc, best_epoch, base_loss, base_acc)


def _compose(stages: Sequence[nn.Module]) -> Callable[[Tensor], Tensor]:
    def forward(h: Tensor) -> Tensor:
        for stage in stages:
            h = stage(h)
        return h

    return forward


class _Capture(fx.Interpreter):
    """Runs a traced stage and keeps the values of ``wanted`` nodes."""

    def __init__(self, gm: fx.GraphModule, wanted: Sequence[fx.Node]) -> None:
        super().__init__(gm)
        self.wanted, self.values = set(wanted), {}

    def run_node(self, n: fx.Node) -> object:
        out = super().run_node(n)
        if n in self.wanted:
            self.values[n] = out
        return out


def _trace(stage: nn.Module) -> fx.GraphModule | None:
    try:
        return fx.symbolic_trace(stage)
    except Exception:  # not traceable (data-dependent control flow, ...): the whole stage is recomputed
        return None


def _inside_stage(
    gm: fx.GraphModule | None, module: nn.Module, h: Tensor, batch_size: int
) -> tuple[Callable[..., Tensor], list[Tensor]] | None:
    """Finer cache inside a stage: ``(sub, inputs)`` with ``sub(*inputs) == stage(h)``, where ``sub`` runs
    only the operations that depend on ``module`` and ``inputs`` are the values (for the whole set) of
    those that do not, e.g. for ``bn2`` of a residual block: the output of ``conv2`` and of the shortcut.
    None if the stage could not be traced or the cut is not a plain per-example one."""
    if gm is None:
        return None
    nodes = list(gm.graph.nodes)
    ids = {id(p) for p in module.parameters(recurse=False)}
    seeds = {n for n in nodes if n.op == "call_module" and gm.get_submodule(n.target) is module}
    seeds |= {n for n in nodes if n.op == "get_attr" and id(_attr(gm, n.target)) in ids}
    if not seeds:
        return None
    dep: set[fx.Node] = set()
    for n in nodes:  # topological order
        if n in seeds or any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    if not any(n.op == "output" for n in dep):
        return None
    frontier: list[fx.Node] = []
    for n in nodes:
        if n in dep:
            frontier += [a for a in n.all_input_nodes if a not in dep and a not in frontier]
    graph, env = fx.Graph(), {}
    cut = [a for a in frontier if a.op != "get_attr"]
    for a in frontier:
        env[a] = graph.placeholder(a.name) if a.op != "get_attr" else graph.node_copy(a, env.__getitem__)
    for n in nodes:
        if n in dep:
            env[n] = graph.node_copy(n, env.__getitem__)
    sub = fx.GraphModule(gm, graph)
    if all(a.op == "placeholder" for a in cut):  # only the stage input: nothing to precompute
        if len(cut) != 1:
            return None
        return sub, [h]
    chunks = []
    for i in range(0, len(h), batch_size):
        cap = _Capture(gm, cut)
        cap.run(h[i : i + batch_size])
        chunk = [cap.values[a] for a in cut]
        if not all(
            isinstance(v, Tensor) and v.dim() > 0 and len(v) == len(h[i : i + batch_size]) for v in chunk
        ):
            return None
        chunks.append(chunk)
    inputs = [torch.cat([c[j] for c in chunks]) for j in range(len(cut))]
    k = min(len(h), 8)  # a cheap guard that the cut reproduces the stage
    if not torch.allclose(sub(*[t[:k] for t in inputs]), gm(h[:k]), rtol=1e-4, atol=1e-5):
        return None
    return sub, inputs


def _attr(gm: nn.Module, target: str) -> object:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _selected(
    model: nn.Module, kinds: Sequence[str], names: Collection[str] | None
) -> list[tuple[str, nn.Module, str]]:
    candidates = candidate_modules(model, set(kinds))
    if names is None:
        return candidates
    unknown = set(names) - {n for n, _, _ in candidates}
    if unknown:
        raise ValueError(f"names={sorted(unknown)}: not candidates of kinds {list(kinds)}")
    return [c for c in candidates if c[0] in names]


def compute_mrc(
    model: nn.Module,
    x_adv: Tensor,
    y: Tensor,
    kinds: Sequence[str],
    proto: MRCProtocol,
    progress: Callable[[str, int, int], None] | None = None,
    names: Collection[str] | None = None,
) -> dict:
    """MRC of every candidate of ``kinds``, fast path. Returns {'rows', 'base_loss', 'base_robust_acc'}.

    Exact: the same ascent steps and evaluations as ``mrc_reference``, computed with less work. Nothing
    before a candidate changes, so the input of its network stage is computed once for the whole set,
    and inside the stage (traced with torch.fx) the values that do not depend on the candidate are
    cached too; each ascent step then runs forward and backward from the candidate on, with gradients
    for its parameters alone (cached inputs do not require grad, so no backward runs below it), and
    each epoch's evaluation doubles as the next epoch's first forward. ``names`` restricts the candidates.
    """
    candidates = _selected(model, kinds, names)
    stages = list(model.stages())
    stage_of: dict[int, int] = {}
    for i, stage in enumerate(stages):
        for m in stage.modules():
            stage_of.setdefault(id(m), i)
    best: dict[str, tuple[float, float, int]] = {}
    ebs = proto.eval_batch_size
    with frozen(model), torch.no_grad():
        h, done = x_adv, 0  # h: input of stage i for the whole set; at the end, the base logits
        for i, stage in enumerate(stages):
            here = [(n, m, k) for n, m, k in candidates if stage_of[id(m)] == i]
            tail = _compose(stages[i + 1 :])
            gm = _trace(stage) if here else None
            for name, module, kind in here:
                cut = _inside_stage(gm, module, h, ebs)
                sub, inputs = cut if cut is not None else (stage, [h])

                def forward(*hs: Tensor, sub: Callable[..., Tensor] = sub, tail: Callable = tail) -> Tensor:
                    return tail(sub(*hs))

                params = perturbed_params(module, kind)
                for p in params:
                    p.requires_grad_(True)
                try:
                    best[name] = _ascent(name, params, forward, inputs, y, proto)
                finally:
                    for p in params:
                        p.requires_grad_(False)
                del inputs, cut
                done += 1
                if progress:
                    progress(name, done, len(candidates))
            h = torch.cat([stage(h[j : j + ebs]) for j in range(0, len(h), ebs)])
        total, correct = _sums(
            lambda idx: h[idx], y, _chunks(slice(0, len(y)), ebs)
        )  # the base loss, no rerun
        base_loss, base_acc = total.item() / len(y), 100.0 * int(correct) / len(y)
    rows = [{"name": n, "type": k, **_result(*best[n], base_loss, base_acc)} for n, _, k in candidates]
    return {"rows": rows, "base_loss": base_loss, "base_robust_acc": base_acc}


def mrc_reference(
    model: nn.Module,
    x_adv: Tensor,
    y: Tensor,
    kinds: Sequence[str],
    proto: MRCProtocol,
    names: Collection[str] | None = None,
) -> dict:
    """The protocol as it reads: per module a fresh copy of the model, full forward and backward."""
    template = copy.deepcopy(model).eval()
    base_loss, base_acc = _loss_and_acc(template, x_adv, y, proto.eval_batch_size)
    rows = []
    for name, _, kind in _selected(template, kinds, names):
        net = copy.deepcopy(template)
        module = dict(net.net.named_modules())[name]
        params = perturbed_params(module, kind)
        for p in net.parameters():
            p.requires_grad_(True)  # as in the original code: the whole network in the graph
        rows.append(
            {
                "name": name,
                "type": kind,
                **_ascent_reference(name, params, net, x_adv, y, proto, base_loss, base_acc),
            }
        )
    return {"rows": rows, "base_loss": base_loss, "base_robust_acc": base_acc}


def select_lowest(rows: Sequence[dict], kinds: Sequence[str], k: int) -> list[dict]:
    """The k candidates of ``kinds`` with the lowest MRC (ties keep network order)."""
    pool = [r for r in rows if r["type"] in kinds]
    if not 1 <= k <= len(pool):
        raise ValueError(
            f"k={k}: must lie between 1 and the number of candidates ({len(pool)} for "
            f"{'+'.join(kinds)}); pick a smaller k"
        )
    return sorted(pool, key=lambda r: r["mrc"])[:k]
