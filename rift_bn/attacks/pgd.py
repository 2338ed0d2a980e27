"""L-inf PGD (Madry et al.): the attack used for adversarial training, evaluation and MRC."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rift_bn.config import ConfigError
from rift_bn.models import frozen


@contextlib.contextmanager
def attack_mode(model: nn.Module, train_mode: bool = False) -> Iterator[None]:
    """Eval mode (the model's own modes with ``train_mode``), no parameter gradients, autograd on (even
    inside validation); restores all of it."""
    with frozen(model, eval_mode=not train_mode), torch.inference_mode(False), torch.enable_grad():
        yield


def _normal(t: Tensor) -> Tensor:
    """``t``, or a normal copy if made under ``torch.inference_mode`` (autograd cannot save those)."""
    return t.clone() if t.is_inference() else t


class PGD:
    """Projected gradient ascent on cross-entropy inside the L-inf ball of radius ``eps`` around ``x``.

    Same update as ``torchattacks.PGD`` (and bit-identical adversarial images for the same random
    start): uniform random start, ``steps`` signed-gradient steps of size ``alpha``, projection onto
    the eps-ball and [0, 1]. With ``restarts > 1`` keeps, per image, the first restart that fools the
    model (worst case over restarts). The model runs without parameter gradients, in eval mode; with
    ``train_mode=True`` in the modes it has (adversarial training as Bag-of-Tricks and Madry's code craft
    it: BatchNorm uses batch statistics, and every forward of the attack updates its running statistics).

    Speed: the whole attack reuses one leaf tensor updated in place (no per-step allocation besides
    autograd's), has no host-device synchronisation inside the step loop, and takes input gradients
    only (parameters do not require grad). Each step performs exactly torchattacks' float operations
    (``adv + alpha * sign(g)``, ``clamp(adv - x, -eps, eps)``, ``clamp(x + delta, 0, 1)``; ``alpha *
    sign(g)`` is exact, so the fused ``add_(sign, alpha=alpha)`` rounds identically).
    """

    @classmethod
    def from_config(cls, acfg, key: str = "attack", train_mode: bool = False) -> PGD:
        """The attack an ``attack``-group config describes (``eps``/``alpha`` as floats or ``"8/255"``);
        ``key`` names the setting in error messages. The one constructor the pipeline and tools use."""
        from rift_bn.config import pixels

        return cls(
            eps=pixels(acfg.eps, f"{key}.eps"),
            alpha=pixels(acfg.alpha, f"{key}.alpha"),
            steps=int(acfg.steps),
            random_start=bool(acfg.random_start),
            restarts=int(acfg.get("restarts", 1)),
            train_mode=train_mode,
        )

    def __init__(
        self,
        eps: float = 8 / 255,
        alpha: float = 2 / 255,
        steps: int = 10,
        random_start: bool = True,
        restarts: int = 1,
        train_mode: bool = False,
    ) -> None:
        if not 0 <= eps <= 1:
            raise ConfigError(f"attack.eps={eps}: must lie in [0, 1] (pixel scale; 8/255 is the paper's)")
        if not 0 < alpha <= 1:
            raise ConfigError(f"attack.alpha={alpha}: must lie in (0, 1] (2/255 is the paper's)")
        if steps < 0 or restarts < 1:
            raise ConfigError(
                f"attack.steps={steps}, attack.restarts={restarts}: need steps >= 0, restarts >= 1"
            )
        self.eps, self.alpha, self.steps = float(eps), float(alpha), int(steps)
        self.random_start, self.restarts = bool(random_start), int(restarts)
        self.train_mode = bool(train_mode)

    def __repr__(self) -> str:
        return (
            f"PGD(eps={self.eps:.5f}, alpha={self.alpha:.5f}, steps={self.steps}, "
            f"random_start={self.random_start}, restarts={self.restarts}, train_mode={self.train_mode})"
        )

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with attack_mode(model, self.train_mode):
            x, y = _normal(x.detach()), _normal(y.detach())
            if self.restarts == 1:
                return self._attack(model, x, y)
            best = self._attack(model, x, y)
            with torch.no_grad():
                fooled = model(best).argmax(1) != y
            for _ in range(self.restarts - 1):
                todo = ~fooled
                if not todo.any():  # one sync per restart, outside the step loop
                    break
                adv = self._attack(model, x[todo], y[todo])
                with torch.no_grad():
                    best[todo] = adv
                    fooled[todo] = model(adv).argmax(1) != y[todo]
            return best

    def _attack(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        eps, alpha = self.eps, self.alpha
        adv = x.clone()
        if self.random_start:  # the same RNG draw as torchattacks: empty_like(x).uniform_(-eps, eps)
            adv.add_(torch.empty_like(adv).uniform_(-eps, eps)).clamp_(0, 1)
        if self.steps == 0:
            return adv
        adv.requires_grad_(True)
        for _ in range(self.steps):
            loss = F.cross_entropy(model(adv), y)
            (grad,) = torch.autograd.grad(loss, adv)
            with torch.no_grad():  # in place on the leaf: the graph of this step is already freed
                adv.add_(grad.sign_(), alpha=alpha)
                adv.sub_(x).clamp_(-eps, eps).add_(x).clamp_(0, 1)
        return adv.detach()
