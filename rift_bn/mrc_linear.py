"""A first-order MRC estimator: one forward and backward pass over the adversarial set for all modules.

Let ``g = grad_W L`` be the gradient of the mean cross-entropy over the adversarial set. Within the ball
||dW|| <= epsilon ||W|| (Frobenius, per tensor, as the exact protocol projects) the largest loss increase
is, to first order, ``epsilon ||W|| ||g||`` (``mrc_ball``). The exact protocol, however, reaches the ball
only if its plain ascent gets there: S = epochs * ``proto.steps(N)`` steps of lr * g move W by about
``S lr ||g||``. Its first-order gain is therefore ``||g|| * min(S lr ||g||, epsilon ||W||)``, which is
``mrc``: equal to the ball bound wherever the ball is reached (every Conv/Linear weight and BN bias of
the bases in docs/performance.md), and much closer to the exact value where it is not (BN weights). A
module's value is the sum over the tensors the exact protocol perturbs (``weight`` for Conv/Linear,
``weight`` and ``bias`` for BatchNorm), each with its own ball.

``robust_acc_drop`` (and ``step_loss_increase``) are measured, not estimated: every tensor of the module
is moved to that first-order end point, ``W + min(S lr ||g||, epsilon ||W||) g / ||g||``, one module at a
time, and the set is evaluated once from the module's network stage on (like the exact fast path).

``python -m benchmarks.mrc_agreement`` measures the estimator against the exact protocol (rank
correlations, agreement of the k lowest, time); see ``docs/performance.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from rift_bn.models import NormalizedModel, candidate_modules, frozen
from rift_bn.mrc import MRCProtocol, ce_sum, compose_stages, loss_and_acc, perturbed_params

ESTIMATOR = "linear"


def _stages(model: nn.Module) -> list[nn.Module]:
    """``model.stages()`` where the network has them, else the whole model as one stage."""
    net = model.net if isinstance(model, NormalizedModel) else model
    return list(model.stages()) if hasattr(net, "stages") and hasattr(model, "stages") else [model]


def set_gradients(
    model: nn.Module, x: Tensor, y: Tensor, params: Sequence[nn.Parameter], batch_size: int
) -> tuple[list[Tensor], float, float]:
    """Gradient of the MEAN cross-entropy over the whole set w.r.t. ``params`` (float64), plus the mean
    loss and accuracy (percent). Runs in batches: per batch the gradient of ``sum CE / N`` is added,
    i.e. each batch's mean-loss gradient weighted by its size / N. The caller sets the modes and flags."""
    n = len(y)
    grads = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    total, correct = torch.zeros((), dtype=torch.float64, device=y.device), 0
    for i in range(0, n, batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        with torch.enable_grad():
            logits = model(xb)
            loss = ce_sum(logits, yb)
            batch_grads = torch.autograd.grad(loss / n, list(params))
        for acc, g in zip(grads, batch_grads, strict=True):
            acc += g.double()
        total += loss.detach().double()
        correct += int((logits.detach().argmax(1) == yb).sum())
    return grads, total.item() / n, 100.0 * correct / n


def ascent_reach(proto: MRCProtocol, n: int) -> float:
    """Path length of the protocol's plain ascent per unit gradient norm: epochs * steps per epoch * lr."""
    return proto.epochs * proto.steps(n) * proto.lr


def linear_mrc(
    model: nn.Module,
    x_adv: Tensor,
    y: Tensor,
    kinds: Sequence[str],
    proto: MRCProtocol,
    measure_step: bool = True,
) -> dict:
    """First-order MRC of every candidate of ``kinds`` from one batched pass; same shape as ``compute_mrc``.

    Rows (in ``candidate_modules`` order): ``name``, ``type``, ``mrc`` (first-order gain of the protocol's
    ascent, see the module docstring), ``mrc_ball`` (the ball bound ``epsilon ||W|| ||g||``),
    ``robust_acc_drop`` and ``step_loss_increase`` measured at the first-order end point (None with
    ``measure_step=False``), ``norms`` (``[||W||, ||g||]`` per perturbed tensor), ``estimator: "linear"``.
    The model runs in eval mode; modes, ``requires_grad`` flags and parameter values are restored.
    """
    candidates = candidate_modules(model, set(kinds))
    per_module = [perturbed_params(module, kind) for _, module, kind in candidates]
    flat = [p for params in per_module for p in params]
    eps, reach = proto.epsilon, ascent_reach(proto, len(y))
    with frozen(model):
        for p in flat:
            p.requires_grad_(True)
        flat_grads, base_loss, base_acc = set_gradients(model, x_adv, y, flat, proto.eval_batch_size)
        for p in flat:
            p.requires_grad_(False)
        grad_of = {id(p): g for p, g in zip(flat, flat_grads, strict=True)}
        steps: dict[int, Tensor] = {}  # first-order end point of the ascent, as a change of each tensor
        rows: list[dict] = []
        for (name, _, kind), params in zip(candidates, per_module, strict=True):
            norms = []
            for p in params:
                g = grad_of[id(p)]
                w_norm, g_norm = p.detach().double().norm().item(), g.norm().item()
                norms.append([w_norm, g_norm])
                length = min(reach * g_norm, eps * w_norm)
                steps[id(p)] = g * (length / g_norm) if g_norm > 0 else torch.zeros_like(g)
            rows.append(
                {
                    "name": name,
                    "type": kind,
                    "mrc": sum(g * min(reach * g, eps * w) for w, g in norms),
                    "mrc_ball": sum(eps * w * g for w, g in norms),
                    "robust_acc_drop": None,
                    "step_loss_increase": None,
                    "norms": norms,
                    "estimator": ESTIMATOR,
                }
            )
        if measure_step:
            _measure_steps(model, x_adv, y, candidates, per_module, steps, proto, base_loss, base_acc, rows)
    return {"rows": rows, "base_loss": base_loss, "base_robust_acc": base_acc}


@torch.no_grad()
def _measure_steps(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    candidates: list[tuple[str, nn.Module, str]],
    per_module: list[list[nn.Parameter]],
    steps: dict[int, Tensor],
    proto: MRCProtocol,
    base_loss: float,
    base_acc: float,
    rows: list[dict],
) -> None:
    """Fill ``robust_acc_drop`` / ``step_loss_increase`` at W + step, one module at a time, evaluating
    from the module's stage on (the stage inputs are computed once, in forward order)."""
    stages = _stages(model)
    stage_of: dict[int, int] = {}
    for i, stage in enumerate(stages):
        for m in stage.modules():
            stage_of.setdefault(id(m), i)
    order = sorted(range(len(candidates)), key=lambda j: stage_of[id(candidates[j][1])])
    h, at, bs = x, 0, proto.eval_batch_size  # h: input of stage `at` for the whole set
    for j in order:
        i = stage_of[id(candidates[j][1])]
        while at < i:
            h = torch.cat([stages[at](h[s : s + bs]) for s in range(0, len(h), bs)])
            at += 1
        params = per_module[j]
        originals = [p.detach().clone() for p in params]
        try:
            for p in params:
                p.add_(steps[id(p)].to(p.dtype))
            loss, acc = loss_and_acc(compose_stages(stages[i:]), h, y, bs)
        finally:
            for p, p0 in zip(params, originals, strict=True):
                p.copy_(p0)
        rows[j]["step_loss_increase"] = loss - base_loss if math.isfinite(loss) else None
        rows[j]["robust_acc_drop"] = base_acc - acc
