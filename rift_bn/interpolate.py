"""Weight-space interpolation between the adversarially trained and the fine-tuned model (RiFT step 3)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


def interpolate_state(base: dict[str, Tensor], tuned: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """theta(a) = (1 - a) theta_AT + a theta_FT over parameters and BN buffers.

    Written as two products (not lerp) so that a = 0 and a = 1 return the end points exactly.
    Integer buffers (``num_batches_tracked``) come from the nearer end point.
    """
    out = {}
    for key, b in base.items():
        t = tuned[key]
        if torch.is_floating_point(b):
            out[key] = (1 - alpha) * b + alpha * t
        else:
            out[key] = (t if alpha >= 0.5 else b).clone()
    return out


def choose_alpha(
    curve: Sequence[dict[str, float]], base_robust_acc: float, tolerance: float
) -> dict[str, float]:
    """Best clean accuracy among the points whose robust accuracy >= base - tolerance (ties: more robust).

    The curve holds alpha = 0 (the base, which meets the rule by definition; the config refuses lists
    without it), or a single point, which is returned as it is (``+experiment=layer_types``: alpha 1)."""
    if len(curve) == 1:
        return curve[0]
    ok = [p for p in curve if p["robust_acc"] >= base_robust_acc - tolerance] or [
        min(curve, key=lambda p: p["alpha"])
    ]
    return max(ok, key=lambda p: (p["clean_acc"], p["robust_acc"], -p["alpha"]))


def interpolated(base: nn.Module, tuned: nn.Module, alpha: float) -> nn.Module:
    """A copy of ``base`` holding theta(alpha)."""
    model = copy.deepcopy(base)
    model.load_state_dict(interpolate_state(base.state_dict(), tuned.state_dict(), alpha))
    return model


def interpolation_curve(
    base: nn.Module,
    tuned: nn.Module,
    alphas: Sequence[float],
    base_point: dict[str, float],
    evaluate: Callable[[nn.Module], dict[str, float]],
) -> list[dict[str, float]]:
    """Accuracy along theta(a) for each of ``alphas`` (ascending): ``evaluate`` of every point, and
    ``base_point`` for a = 0 (theta(0) is the base model exactly, evaluated the same way)."""
    base_sd, tuned_sd = base.state_dict(), tuned.state_dict()
    probe = copy.deepcopy(base)
    curve = []
    for a in sorted(float(a) for a in alphas):
        if a == 0.0:
            point = base_point
        else:
            probe.load_state_dict(interpolate_state(base_sd, tuned_sd, a))
            point = evaluate(probe)
        curve.append({"alpha": a, "clean_acc": point["clean_acc"], "robust_acc": point["robust_acc"]})
    return curve
