"""Clean / PGD / AutoAttack evaluation on in-memory uint8 images."""

from __future__ import annotations

import torch
from torch import nn

from rift_bn.attacks import PGD, autoattack
from rift_bn.evaluate import evaluate


def test_evaluate_counts_and_autoattack_stays_in_the_ball() -> None:
    torch.manual_seed(0)
    # A linear classifier that 8/255 can fool everywhere, so AutoAttack finishes after its first attack.
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()
    nn.init.normal_(model[1].weight)
    x = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    xf = x.float() / 255
    y = model(xf).argmax(1).detach()  # labels the model gets right...
    y[:3] = (y[:3] + 1) % 10  # ...except three: clean accuracy 75%
    out = evaluate(model, x, y, PGD(steps=3), num_classes=10, batch_size=5, autoattack_eps=8 / 255)
    assert out["clean_acc"] == 75.0
    assert out["robust_acc"] == 0.0 and out["autoattack_acc"] == 0.0
    adv = autoattack(model, xf[:4], y[:4], eps=8 / 255, num_classes=10)
    assert adv.shape == xf[:4].shape and (adv - xf[:4]).abs().max() <= 8 / 255 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert not model.training and all(p.requires_grad for p in model.parameters())
