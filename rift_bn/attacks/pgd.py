"""L-inf PGD (Madry et al.): the attack used for adversarial training, evaluation and MRC."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@contextlib.contextmanager
def attack_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, no parameter gradients, autograd on (even inside validation); restores all of it."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


class PGD:
    """Projected gradient ascent on cross-entropy inside the L-inf ball of radius ``eps`` around ``x``.

    Same update as ``torchattacks.PGD`` (and bit-identical adversarial images for the same random
    start): uniform random start, ``steps`` signed-gradient steps of size ``alpha``, projection onto
    the eps-ball and [0, 1]. With ``restarts > 1`` keeps, per image, the first restart that fools the
    model (worst case over restarts). The model runs in eval mode without parameter gradients.
    """

    def __init__(
        self, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10, random_start: bool = True,
        restarts: int = 1,
    ) -> None:
        if not 0 <= eps <= 1:
            raise ValueError(f"attack.eps={eps}: must lie in [0, 1] (pixel scale; 8/255 is the paper's)")
        if not 0 < alpha <= 1:
            raise ValueError(f"attack.alpha={alpha}: must lie in (0, 1] (2/255 is the paper's)")
        if steps < 0 or restarts < 1:
            raise ValueError(f"attack.steps={steps}, attack.restarts={restarts}: need steps >= 0, restarts >= 1")
        self.eps, self.alpha, self.steps = float(eps), float(alpha), int(steps)
        self.random_start, self.restarts = bool(random_start), int(restarts)

    def __repr__(self) -> str:
        return (f"PGD(eps={self.eps:.5f}, alpha={self.alpha:.5f}, steps={self.steps}, "
                f"random_start={self.random_start}, restarts={self.restarts})")

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with attack_mode(model):
            x = x.detach()
            if self.restarts == 1:
                return self._attack(model, x, y)
            best = self._attack(model, x, y)
            with torch.no_grad():
                fooled = model(best).argmax(1) != y
            for _ in range(self.restarts - 1):
                todo = ~fooled
                if not todo.any():
                    break
                adv = self._attack(model, x[todo], y[todo])
                with torch.no_grad():
                    best[todo] = adv
                    fooled[todo] = model(adv).argmax(1) != y[todo]
            return best

    def _attack(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        adv = x.clone()
        if self.random_start:
            adv = (adv + torch.empty_like(adv).uniform_(-self.eps, self.eps)).clamp_(0, 1)
        for _ in range(self.steps):
            adv.requires_grad_(True)
            loss = F.cross_entropy(model(adv), y)
            (grad,) = torch.autograd.grad(loss, adv)
            with torch.no_grad():  # the same float operations as torchattacks, hence identical images
                delta = (adv + self.alpha * grad.sign() - x).clamp_(-self.eps, self.eps)
                adv = (x + delta).clamp_(0, 1)
        return adv.detach()
