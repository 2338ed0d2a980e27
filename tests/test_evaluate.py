"""Clean / PGD / AutoAttack evaluation on in-memory uint8 images."""

from __future__ import annotations

import pytest
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


def _bn_model() -> nn.Module:
    """A small BatchNorm conv net whose eval-mode and train-mode (batch statistics) predictions differ."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=4),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
        nn.BatchNorm1d(10),
    )
    with torch.no_grad():  # running statistics far from any batch's, so that a train-mode pass shows
        for m in (model[1], model[5]):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model


def _eval_once(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    torch.manual_seed(3)  # the same PGD random start for every call
    attack = PGD(eps=2 / 255, alpha=1 / 255, steps=2)
    return evaluate(model, x, y, attack, num_classes=10, batch_size=5)


def test_evaluate_restores_train_modes_and_leaves_batchnorm_statistics_alone() -> None:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randint(
            0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
        )
        reference = _bn_model().eval()
        with torch.no_grad():
            y = reference(x.float() / 255).argmax(1)  # labels the eval-mode model gets right...
            batch_stats = torch.cat([_bn_model().train()(x[i : i + 5].float() / 255) for i in (0, 5, 10)])
        assert (batch_stats.argmax(1) != y).sum() >= 6  # (train-mode predictions differ a lot)
        y[:3] = (y[:3] + 1) % 10  # ...except three: clean accuracy 75% in eval mode
        expected = _eval_once(reference, x, y)
        assert expected["clean_acc"] == 75.0 and 0 < expected["robust_acc"] < 75.0
        assert not reference.training

        model = _bn_model().train()
        model[1].eval()  # a mixed state, as while fine-tuning with bn_stats=selected
        modes = {n: m.training for n, m in model.named_modules()}
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        state = {k: v.clone() for k, v in model.state_dict().items()}
        assert model.training and sum(modes.values()) == len(modes) - 1

        assert _eval_once(model, x, y) == expected  # evaluated in eval mode, as the eval-mode model
        assert {n: m.training for n, m in model.named_modules()} == modes
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert all(p.grad is None for p in model.parameters())
        after = model.state_dict()  # running statistics and num_batches_tracked bit-identical
        assert after.keys() == state.keys()
        assert all(torch.equal(after[k], v) for k, v in state.items())
        # ...whereas a train-mode forward would have moved them: the check above can fail.
        with torch.no_grad():
            model(x[:5].float() / 255)
        assert not torch.equal(model[5].running_mean, state["5.running_mean"])

        class Broken(PGD):
            def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                raise RuntimeError("attack failed")

        with pytest.raises(RuntimeError, match="attack failed"):  # modes come back on errors too
            evaluate(model, x, y, Broken(), num_classes=10, batch_size=5)
        assert {n: m.training for n, m in model.named_modules()} == modes
    finally:
        torch.set_num_threads(old)


def test_per_image_outcomes_match_torchmetrics_and_give_exact_fractions() -> None:
    """Per-image correctness counts as torchmetrics' micro accuracy counts (the reference), and the
    accuracy is the exact fraction of the counts: 31 of 100 is 31.0, not 31.00000023841858."""
    from torchmetrics.classification import MulticlassAccuracy

    from rift_bn.evaluate import accuracies, per_image

    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()
    x = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8)
    y = model(x.float() / 255).argmax(1).detach()
    y[31:] = (y[31:] + 1) % 10  # exactly 31 right
    torch.manual_seed(5)
    correct = per_image(model, x, y, PGD(eps=2 / 255, alpha=1 / 255, steps=2), 10, batch_size=30)
    assert correct["clean"].dtype == torch.bool and correct["clean"].shape == (100,)
    assert correct["clean"].tolist() == [True] * 31 + [False] * 69
    ref = MulticlassAccuracy(10, average="micro")
    ref.update(model(x.float() / 255), y)
    assert accuracies(correct)["clean_acc"] == 31.0
    assert 100 * ref.compute().item() != 31.0  # the float32 noise the exact fraction removes
    assert round(100 * ref.compute().item(), 4) == 31.0
    torch.manual_seed(5)  # the same random starts: the same images fooled
    again = evaluate(model, x, y, PGD(eps=2 / 255, alpha=1 / 255, steps=2), 10, batch_size=30)
    assert again["robust_acc"] == int(correct["robust"].sum()) * 100 / 100


def test_validation_accuracy_is_the_exact_fraction_of_torchmetrics_counts() -> None:
    """The per-epoch validation accuracy (results.json's histories, the best-epoch choice) is the exact
    fraction of the metric's counts: 31 of 100 is 31.0, where its float32 ``compute()`` is not."""
    from torchmetrics.classification import MulticlassAccuracy

    from rift_bn.modules.common import exact_percent

    metric = MulticlassAccuracy(10, average="micro")
    y = torch.arange(100) % 10
    for rows in (slice(0, 60), slice(60, 100)):  # two batches
        pred = y[rows].clone()
        pred[pred.numel() // 2 :] += 1  # 30 + 20 wrong: 50 of 100
        metric.update(pred % 10, y[rows])
    assert exact_percent(metric) == 50.0
    metric.reset()
    metric.update(torch.cat([y[:31], (y[31:] + 1) % 10]), y)
    assert 100 * metric.compute().item() != 31.0 and exact_percent(metric) == 31.0
