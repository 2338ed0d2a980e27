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
for tests and the benchmark (``python -m benchmarks.bench``). ``bounded_mrc`` (``mrc.exact_lowest``) gives
the n lowest MRCs exactly, the same values as ``compute_mrc``, and a lower bound for every other module,
advancing one epoch at a time only the modules that could still be among the n lowest.
"""

from __future__ import annotations

import collections
import copy
import itertools
import math
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from rift_bn.config import ConfigError
from rift_bn.data import to_float
from rift_bn.errors import NonFiniteLoss
from rift_bn.models import candidate_modules, frozen
from rift_bn.seeds import SeedStream, seeded

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


def adversarial_examples(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: Callable[[nn.Module, Tensor, Tensor], Tensor],
    batch_size: int,
    device: torch.device | str,
    seed: int,
) -> Tensor:
    """MRC's adversarial set: ``attack(model, ...)`` on images ``x`` (uint8, converted per batch, or float
    in [0, 1]) with labels ``y``, in batches of ``batch_size`` on ``device``; returned on the CPU.

    Runs on the job ``seed``'s ``SeedStream.ADVERSARIAL_SET``, forked, so the set depends on nothing run
    before it and the caller's RNG state is kept."""
    with seeded(seed, SeedStream.ADVERSARIAL_SET):
        out = []
        for i in range(0, len(y), batch_size):
            xb = x[i : i + batch_size].to(device)
            xb = to_float(xb) if xb.dtype == torch.uint8 else xb
            out.append(attack(model, xb, y[i : i + batch_size].to(device)).cpu())
    return torch.cat(out)


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
def loss_and_acc(
    forward: Callable[[Tensor], Tensor], h: Tensor, y: Tensor, batch_size: int
) -> tuple[float, float]:
    """Mean cross-entropy (float64 accumulation) and accuracy (percent) of ``forward`` over the whole set
    ``h`` (labels ``y``), in batches of ``batch_size``: MRC's base and per-epoch evaluation."""
    total, correct = _sums(lambda idx: forward(h[idx]), y, _chunks(slice(0, len(y)), batch_size))
    return total.item() / len(y), 100.0 * int(correct) / len(y)


def ce_sum(logits: Tensor, y: Tensor) -> Tensor:
    """Summed cross-entropy in at least float32 (float64 stays float64): MRC's loss of one batch."""
    if logits.dtype != torch.float64:
        logits = logits.float()
    return F.cross_entropy(logits, y, reduction="sum")


def _sums(logits_of: Callable[[Index], Tensor], y: Tensor, chunks: Sequence[Index]) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy (float64) and number correct over ``chunks``, on the device (no sync)."""
    total = torch.zeros((), dtype=torch.float64, device=y.device)
    correct = torch.zeros((), dtype=torch.int64, device=y.device)
    for idx in chunks:
        logits = logits_of(idx)
        total += ce_sum(logits, y[idx]).double()
        correct += (logits.argmax(1) == y[idx]).sum()
    return total, correct


def _result(best_loss: float, best_acc: float, best_epoch: int, base_loss: float, base_acc: float) -> dict:
    return {"mrc": best_loss - base_loss, "robust_acc_drop": base_acc - best_acc, "epoch": best_epoch}


def _check_finite(loss: float, name: str, epoch: int) -> None:
    if not math.isfinite(loss):
        raise NonFiniteLoss(
            f"mrc: loss is {loss} for module {name} at epoch {epoch}; lower mrc.lr or mrc.epsilon"
        )


@dataclass
class ModuleState:
    """Where one module's ascent stands between epochs: enough to continue it bit for bit.

    The batch stream needs no state of its own: it is a pure function of the protocol, so after
    ``epochs_run`` epochs it continues at batch ``epochs_run * proto.steps(n)``."""

    epochs_run: int = 0
    best_loss: float = -math.inf  # the largest loss over the epochs run (a lower bound of the final one)
    best_acc: float = math.nan  # the accuracy at that epoch
    best_epoch: int = 0
    params: list[Tensor] | None = None  # the perturbed tensors after ``epochs_run`` epochs

    def to_dict(self) -> dict:
        """Plain types and CPU tensors (``torch.save(weights_only=True)`` reads them back)."""
        params = None if self.params is None else [p.detach().cpu().clone() for p in self.params]
        return {
            "epochs_run": self.epochs_run,
            "best_loss": self.best_loss,
            "best_acc": self.best_acc,
            "best_epoch": self.best_epoch,
            "params": params,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ModuleState:
        return cls(
            int(d["epochs_run"]),
            float(d["best_loss"]),
            float(d["best_acc"]),
            int(d["best_epoch"]),
            d["params"],
        )


class _Ascent:
    """One module's gradient ascent on ``params`` only, an epoch at a time, projection per epoch.

    ``compute_mrc`` runs every epoch in a row; ``bounded_mrc`` pauses a module after any epoch
    (``pause``: the perturbed tensors go into ``state``, the base weights back into the module) and
    resumes it later from ``state``, with the same float operations either way.

    ``forward(*inputs[idx])`` gives the logits of examples ``idx``. Same steps and evaluations as the
    protocol, with one saving: the evaluation after an epoch runs the next epoch's first batch with its
    graph kept, and that graph gives the first ascent step of the next epoch (the parameters are the same
    in both), so that batch is not run forward twice. A resumed ascent has lost that graph and runs the
    same forward again.
    """

    def __init__(
        self,
        name: str,
        params: list[nn.Parameter],
        forward: Callable[..., Tensor],
        inputs: Sequence[Tensor],
        y: Tensor,
        proto: MRCProtocol,
        state: ModuleState | None = None,
    ) -> None:
        self.name, self.params, self.forward, self.inputs, self.y = name, params, forward, inputs, y
        self.proto = proto
        self.state = state if state is not None else ModuleState()
        self.n = len(y)
        self.originals = [p.detach().clone() for p in params]  # the base weights (the module at rest)
        if self.state.params is not None:
            with torch.no_grad():
                for p, saved in zip(params, self.state.params, strict=True):
                    p.copy_(saved)
        self.stream = batch_stream(self.n, proto, y.device)
        skip = self.state.epochs_run * proto.steps(self.n)  # where the stream stood after those epochs
        collections.deque(itertools.islice(self.stream, skip), maxlen=0)
        self.order = _epoch(self.stream, self.n, proto) if not self.finished else []
        self.pending: Tensor | None = None  # mean loss of order[0] at the current parameters, with its graph

    @property
    def finished(self) -> bool:
        return self.state.epochs_run >= self.proto.epochs

    def _first(self, idx: Index) -> tuple[Tensor, Tensor, Tensor]:
        """Logits, per-example cross-entropy (as ``ce_sum`` widens) and their mean, graph kept."""
        with torch.enable_grad():
            logits = self.forward(*_take(self.inputs, idx))
            wide = logits if logits.dtype == torch.float64 else logits.float()
            ce = F.cross_entropy(wide, self.y[idx], reduction="none")
            return logits, ce, ce.mean()

    def epoch(self) -> None:
        """Run the next epoch: its ascent steps, the projection, the evaluation over the whole set."""
        proto, y, n, st = self.proto, self.y, self.n, self.state
        epoch = st.epochs_run + 1
        if epoch > proto.epochs:
            raise RuntimeError(f"mrc: {self.name} has run all {proto.epochs} epochs")
        for b, idx in enumerate(self.order):
            with torch.enable_grad():
                if b == 0 and self.pending is not None:
                    loss, self.pending = self.pending, None
                elif b == 0 and epoch > 1:  # resumed: the same forward the evaluation ran
                    loss = self._first(idx)[2]
                else:
                    loss = F.cross_entropy(self.forward(*_take(self.inputs, idx)), y[idx])
                grads = torch.autograd.grad(loss, self.params)
            with torch.no_grad():
                torch._foreach_add_(self.params, grads, alpha=proto.lr)  # ascent: plain SGD on -loss
        project_(self.params, self.originals, proto.epsilon)
        with torch.no_grad():
            rest: list[Index] = _chunks(slice(0, n), proto.eval_batch_size)
            total = torch.zeros((), dtype=torch.float64, device=y.device)
            correct = torch.zeros((), dtype=torch.int64, device=y.device)
            self.order = []
            if epoch < proto.epochs:
                self.order = _epoch(self.stream, n, proto)
                first = self.order[0]
                logits, ce, self.pending = self._first(first)
                total += ce.detach().double().sum()
                correct += (logits.detach().argmax(1) == y[first]).sum()
                rest = _rest(first, n, proto.eval_batch_size, y.device)
            t, c = _sums(lambda idx: self.forward(*_take(self.inputs, idx)), y, rest)
            loss_e, acc_e = (total + t).item() / n, 100.0 * int(correct + c) / n
        _check_finite(loss_e, self.name, epoch)
        if loss_e > st.best_loss:
            st.best_loss, st.best_acc, st.best_epoch = loss_e, acc_e, epoch
        st.epochs_run = epoch

    def pause(self) -> ModuleState:
        """Keep the perturbed tensors in ``state`` (unless finished) and put the base weights back."""
        self.pending = None
        with torch.no_grad():
            self.state.params = None if self.finished else [p.detach().clone() for p in self.params]
            for p, p0 in zip(self.params, self.originals, strict=True):
                p.copy_(p0)
        return self.state


def _ascent(
    name: str,
    params: list[nn.Parameter],
    forward: Callable[..., Tensor],
    inputs: Sequence[Tensor],
    y: Tensor,
    proto: MRCProtocol,
) -> tuple[float, float, int]:
    """Every epoch of one module's ascent (``_Ascent``); restores the parameters afterwards.
    Returns the largest loss over the epochs, the accuracy then and that epoch."""
    ascent = _Ascent(name, params, forward, inputs, y, proto)
    try:
        while not ascent.finished:
            ascent.epoch()
    finally:
        st = ascent.pause()
    return st.best_loss, st.best_acc, st.best_epoch


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
            loss_e, acc_e = loss_and_acc(forward, h, y, proto.eval_batch_size)
            _check_finite(loss_e, name, epoch)
            if loss_e > best_loss:
                best_loss, best_acc, best_epoch = loss_e, acc_e, epoch
    finally:
        with torch.no_grad():
            for p, p0 in zip(params, originals, strict=True):
                p.copy_(p0)
    return _result(best_loss, best_acc, best_epoch, base_loss, base_acc)


def compose_stages(stages: Sequence[nn.Module]) -> Callable[[Tensor], Tensor]:
    """``stages`` run one after another, as one function (the identity for none)."""

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
            tail = compose_stages(stages[i + 1 :])
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
    rows = [
        {
            "name": n,
            "type": k,
            **_result(*best[n], base_loss, base_acc),
            "status": EXACT,
            "epochs_run": proto.epochs,
        }
        for n, _, k in candidates
    ]
    return {"rows": rows, "base_loss": base_loss, "base_robust_acc": base_acc}


EXACT, LOWER_BOUND = "exact", "lower_bound"  # a row's ``status``: its MRC, or a lower bound of it so far
Key = tuple[float, int]  # (MRC or lower bound, network index): select_lowest's order, ties in network order


def row_status(row: dict) -> str:
    """``exact`` or ``lower_bound``; a row without ``status`` (a table from before bounded MRC) is exact."""
    status = row.get("status", EXACT)
    if status not in (EXACT, LOWER_BOUND):
        raise ValueError(f"mrc row {row.get('name')}: status={status!r}, expected {EXACT} or {LOWER_BOUND}")
    return status


def _below(finished: Sequence[Key], unfinished: Sequence[Key], n: int | None) -> list[Key]:
    """The unfinished keys that might still be among the ``n`` lowest (``None``: all of them), given
    the finished (exact) keys: those below the n-th lowest finished key. An MRC is at least its bound,
    so a module whose (bound, index) lies above that key can never rank among the n lowest."""
    if n is None or len(finished) < n:
        return list(unfinished)
    nth = sorted(finished)[n - 1]
    return [k for k in unfinished if k < nth]


def lowest_proven(rows: Sequence[dict], n: int | None) -> bool:
    """Whether ``rows`` (one candidate set, network order) give the ``n`` lowest MRCs exactly: the n
    lowest of the exact rows are below every lower bound (``n=None``: every row is exact)."""
    exact = [(r["mrc"], i) for i, r in enumerate(rows) if row_status(r) == EXACT]
    bounds = [(r["mrc"], i) for i, r in enumerate(rows) if row_status(r) == LOWER_BOUND]
    if n is None or n >= len(rows):
        return not bounds
    return len(exact) >= n and not _below(exact, bounds, n)


def bounded_mrc(
    model: nn.Module,
    x_adv: Tensor,
    y: Tensor,
    kinds: Sequence[str],
    proto: MRCProtocol,
    exact_lowest: int | None,
    known: Mapping[str, dict] | None = None,
    states: Mapping[str, ModuleState] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    names: Collection[str] | None = None,
) -> dict:
    """The exact MRC of the ``exact_lowest`` lowest candidates and a lower bound for every other one.

    MRC(M) is the largest loss increase over the epochs, so after j epochs the largest so far is a lower
    bound that only grows. Every epoch goes to the unfinished module with the smallest key (bound,
    network index; a module not yet started has bound -inf), until ``exact_lowest`` modules are finished
    and every unfinished key lies above the n-th lowest finished one: then no unfinished module can be
    among the n lowest, ties included (``select_lowest`` sorts by MRC, ties in network order). Finished
    modules take exactly ``compute_mrc``'s steps (the same ``_Ascent``, paused and resumed), so their
    values are its values (bit for bit on CPU). ``exact_lowest=None``: every module to the end, in
    network order (continuing ``states``).

    ``known``: exact rows already computed (by name; not recomputed). ``states``: paused ascents to
    continue (a previous call's ``states``). Stage inputs of the whole set are computed once and kept
    for the stages with unfinished modules; a resumed module recomputes the cached values inside its
    stage (one stage forward over the set) and its first batch's forward.

    Returns {'rows', 'base_loss', 'base_robust_acc', 'states', 'stats'}: rows in network order with
    ``status`` (``exact`` | ``lower_bound``) and ``epochs_run``; ``states`` the unfinished modules'
    ``ModuleState`` (tensors on the CPU), to pass back to continue; ``stats`` the epochs run by this call
    (``epochs``), by all calls (``epochs_total``), the module loads and their seconds, and the peak bytes
    of cached stage inputs.
    """
    if exact_lowest is not None and exact_lowest < 1:
        raise ConfigError(f"exact_lowest={exact_lowest}: need a whole number >= 1 or None (all exact)")
    candidates = _selected(model, kinds, names)
    epochs = proto.epochs
    index = {name: i for i, (name, _, _) in enumerate(candidates)}
    known = {n: r for n, r in (known or {}).items() if n in index and row_status(r) == EXACT}
    state: dict[str, ModuleState] = {}
    for name, _, _ in candidates:
        if name not in known:
            s = (states or {}).get(name)
            state[name] = copy.copy(s) if s is not None else ModuleState()
            if not 0 <= state[name].epochs_run < proto.epochs:
                raise ValueError(f"mrc: {name}'s state has {state[name].epochs_run} of {epochs} epochs run")
    stages = list(model.stages())
    stage_of: dict[int, int] = {}
    for i, stage in enumerate(stages):
        for m in stage.modules():
            stage_of.setdefault(id(m), i)
    where = {name: stage_of[id(module)] for name, module, _ in candidates}
    ebs = proto.eval_batch_size
    rows: dict[str, dict] = {
        n: {**r, "status": EXACT, "epochs_run": r.get("epochs_run", epochs)} for n, r in known.items()
    }
    stats = {"epochs": 0, "loads": 0, "load_seconds": 0.0, "stage_input_bytes": 0}
    with frozen(model), torch.no_grad():
        # one pass over the stages: the base loss, and the input of every stage that has work left
        inputs_of: dict[int, Tensor] = {}
        need = {where[n] for n in state}
        h = x_adv
        for i, stage in enumerate(stages):
            if i in need:
                inputs_of[i] = h
            h = torch.cat([stage(h[j : j + ebs]) for j in range(0, len(h), ebs)])
        base_loss, base_acc = loss_and_acc(lambda t: t, h, y, ebs)  # no rerun: h holds the logits
        del h
        stats["stage_input_bytes"] = sum(t.numel() * t.element_size() for t in inputs_of.values())

        def key(name: str) -> Key:
            if name in rows:
                return (rows[name]["mrc"], index[name])
            s = state[name]
            return (s.best_loss - base_loss if s.epochs_run else -math.inf, index[name])

        traced: dict[int, fx.GraphModule | None] = {}
        modules = {name: (module, kind) for name, module, kind in candidates}

        def load(name: str) -> tuple[_Ascent, list[nn.Parameter]]:
            t0 = time.perf_counter()
            module, kind = modules[name]
            i = where[name]
            if i not in traced:
                traced[i] = _trace(stages[i])
            cut = _inside_stage(traced[i], module, inputs_of[i], ebs)
            sub, inputs = cut if cut is not None else (stages[i], [inputs_of[i]])
            tail = compose_stages(stages[i + 1 :])

            def forward(*hs: Tensor) -> Tensor:
                return tail(sub(*hs))

            params = perturbed_params(module, kind)
            for p in params:
                p.requires_grad_(True)
            stats["loads"] += 1
            stats["load_seconds"] += time.perf_counter() - t0
            return _Ascent(name, params, forward, inputs, y, proto, state[name]), params

        def unload(loaded: tuple[_Ascent, list[nn.Parameter]]) -> None:
            ascent, params = loaded
            try:
                state[ascent.name] = ascent.pause()
            finally:
                for p in params:
                    p.requires_grad_(False)

        loaded: tuple[_Ascent, list[nn.Parameter]] | None = None
        done = sum(s.epochs_run for s in state.values()) + epochs * len(rows)
        try:
            while True:
                open_ = [n for n in state if n not in rows]
                if exact_lowest is None:
                    todo = open_[:1]  # network order, each to its end: compute_mrc's schedule
                else:
                    finished = [key(n) for n in rows]
                    left = set(_below(finished, [key(n) for n in open_], exact_lowest))
                    todo = [n for n in open_ if key(n) in left]
                if not todo:
                    break
                pick = min(todo, key=key)
                if loaded is not None and loaded[0].name != pick:
                    unload(loaded)
                    loaded = None
                if loaded is None:
                    loaded = load(pick)
                ascent = loaded[0]
                ascent.epoch()
                stats["epochs"] += 1
                done += 1
                if ascent.finished:
                    unload(loaded)
                    loaded = None
                    s = state[pick]
                    module, kind = modules[pick]
                    rows[pick] = {
                        "name": pick,
                        "type": kind,
                        **_result(s.best_loss, s.best_acc, s.best_epoch, base_loss, base_acc),
                        "status": EXACT,
                        "epochs_run": epochs,
                    }
                    if not any(where[n] == where[pick] for n in state if n not in rows):
                        inputs_of.pop(where[pick], None)  # no work left in this stage
                if progress:
                    progress(f"{pick} (epoch {ascent.state.epochs_run})", done, epochs * len(candidates))
        finally:
            if loaded is not None:
                unload(loaded)
    out_rows, out_states = [], {}
    for name, _, kind in candidates:
        if name in rows:
            out_rows.append(rows[name])
            continue
        s = state[name]
        out_rows.append(
            {
                "name": name,
                "type": kind,
                **_result(s.best_loss, s.best_acc, s.best_epoch, base_loss, base_acc),
                "status": LOWER_BOUND,
                "epochs_run": s.epochs_run,
            }
        )
        out_states[name] = ModuleState.from_dict(s.to_dict())  # tensors on the CPU
    stats["epochs_total"] = sum(r["epochs_run"] for r in out_rows)
    return {
        "rows": out_rows,
        "base_loss": base_loss,
        "base_robust_acc": base_acc,
        "states": out_states,
        "stats": stats,
    }


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
    base_loss, base_acc = loss_and_acc(template, x_adv, y, proto.eval_batch_size)
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
    """The k candidates of ``kinds`` with the lowest MRC (ties keep network order), from exact rows only.

    A ``lower_bound`` row (``bounded_mrc``) is never selected; if its bound lies below the k-th lowest
    exact MRC, its exact value could be among the k lowest and the selection is refused."""
    pool = [r for r in rows if r["type"] in kinds]
    if not 1 <= k <= len(pool):
        raise ConfigError(
            f"k={k}: must lie between 1 and the number of candidates ({len(pool)} for "
            f"{'+'.join(kinds)}); pick a smaller k"
        )
    exact = sorted((r["mrc"], i) for i, r in enumerate(pool) if row_status(r) == EXACT)
    if len(exact) < k:
        raise ConfigError(
            f"k={k}: only {len(exact)} of the {len(pool)} candidates have an exact MRC (the others are lower "
            f"bounds); compute at least {k} exactly (mrc.exact_lowest >= {k}, or null for all)"
        )
    bounds = [(r["mrc"], i) for i, r in enumerate(pool) if row_status(r) == LOWER_BOUND]
    if unsure := _below(exact, bounds, k):
        name = pool[unsure[0][1]]["name"]
        raise ConfigError(
            f"k={k}: {name} has only a lower bound ({unsure[0][0]:.6g}) below the k-th lowest exact MRC, "
            f"so it could be among the k lowest; compute it exactly (mrc.exact_lowest >= {k}, or null)"
        )
    return [pool[i] for _, i in exact[:k]]
