"""RiFT building blocks: MRC projection and values, selection, freezing, BN statistics, interpolation."""

from __future__ import annotations

import pytest
import torch

from rift_bn.attacks import PGD
from rift_bn.callbacks import ModuleSelection
from rift_bn.data import CIFARDataModule
from rift_bn.interpolate import choose_alpha, interpolate_state
from rift_bn.models import build_model, candidate_modules
from rift_bn.modules import FineTuning, quiet_trainer
from rift_bn.mrc import MRCProtocol, compute_mrc, mrc_reference, project_, select_lowest


def test_projection_respects_epsilon() -> None:
    g = torch.Generator().manual_seed(0)
    for scale in (1e-3, 0.05, 1.0, 10.0):
        p0 = torch.randn(16, 8, 3, 3, generator=g)
        p = p0 + scale * torch.randn(p0.shape, generator=g)
        inside = (p - p0).norm() <= 0.1 * p0.norm()
        before = p.clone()
        project_([p], [p0], 0.1)
        assert (p - p0).norm() <= 0.1 * p0.norm() * (1 + 1e-6)
        if inside:
            assert torch.equal(p, before)  # already inside the ball: untouched
        else:  # on the boundary, same direction
            assert (p - p0).norm() == pytest.approx(0.1 * p0.norm().item(), rel=1e-5)
            cos = torch.nn.functional.cosine_similarity((p - p0).flatten(), (before - p0).flatten(), dim=0)
            assert cos.item() == pytest.approx(1.0, abs=1e-6)


@pytest.fixture(scope="module")
def tiny_adv() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("resnet18", 10, 4).eval()
    x, y = torch.rand(48, 3, 32, 32), torch.randint(0, 10, (48,))
    return model, PGD(steps=2)(model, x, y), y


def test_fast_mrc_equals_the_protocol_as_it_reads(tiny_adv) -> None:
    model, x, y = tiny_adv
    proto = MRCProtocol(epochs=2, batch_size=16, eval_batch_size=24)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = compute_mrc(model, x, y, ("conv", "linear", "bn"), proto)
    ref = mrc_reference(model, x, y, ("conv", "linear", "bn"), proto)
    assert [r["name"] for r in fast["rows"]] == [r["name"] for r in ref["rows"]] and len(fast["rows"]) == 41
    for a, b in zip(fast["rows"], ref["rows"], strict=True):
        assert a["mrc"] == pytest.approx(b["mrc"], rel=1e-4, abs=1e-6), a["name"]
        assert a["robust_acc_drop"] == pytest.approx(b["robust_acc_drop"], abs=1e-9)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the base is restored
    assert all(r["mrc"] >= 0 for r in fast["rows"])  # ascent never ends below the start... (max over epochs)


def test_select_lowest_and_bad_k() -> None:
    rows = [
        {"name": f"m{i}", "type": t, "mrc": v}
        for i, (t, v) in enumerate([("conv", 0.3), ("bn", 0.1), ("linear", 0.2), ("bn", 0.05), ("conv", 0.2)])
    ]
    assert [r["name"] for r in select_lowest(rows, ("conv", "linear", "bn"), 3)] == ["m3", "m1", "m2"]
    assert [r["name"] for r in select_lowest(rows, ("conv", "linear"), 2)] == [
        "m2",
        "m4",
    ]  # ties: network order
    with pytest.raises(ValueError, match=r"^k=4: .*\(3 for conv\+linear\)"):
        select_lowest(rows, ("conv", "linear"), 4)


def _finetune(cifar_root, bn_stats: str, selected: list[str]) -> tuple[dict, dict]:
    dm = CIFARDataModule(
        "cifar10",
        cifar_root,
        val_size=32,
        train_subset=256,
        test_subset=10,
        batch_size=64,
        eval_batch_size=32,
        seed=0,
        download=False,
    )
    torch.manual_seed(0)
    model = build_model("resnet18", 10, 4)
    rows = [
        {"name": n, "type": t, "mrc": 0.0 if n in selected else 1.0}
        for n, _, t in candidate_modules(model, {"conv", "linear", "bn"})
    ]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    module = FineTuning(model, PGD(steps=1), 10, lr=0.05, milestones=(10,))
    callback = ModuleSelection(("conv", "linear", "bn"), len(selected), rows, bn_stats)
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=1, callbacks=[callback])
    trainer.fit(module, datamodule=dm)  # validation in between: Lightning toggles train()/eval()
    assert sorted(s["name"] for s in callback.selected) == sorted(selected)
    return before, {k: v.detach() for k, v in model.state_dict().items()}


SELECTED = ["layer2.0.conv1", "layer1.1.bn2", "layer3.0.shortcut.1"]
SELECTED_BN = ("layer1.1.bn2", "layer3.0.shortcut.1")


def test_frozen_parameters_and_bn_statistics(cifar_root) -> None:
    before, after = _finetune(cifar_root, "selected", SELECTED)
    for key in before:
        module = key.rsplit(".", 1)[0].removeprefix("net.")
        if module in SELECTED:
            if key.endswith(("weight", "bias", "running_mean", "running_var")):
                assert not torch.equal(before[key], after[key]), f"{key} should have changed"
        else:  # every other parameter and BN buffer bit-identical
            assert torch.equal(before[key], after[key]), f"{key} changed"
    for bn in SELECTED_BN:
        assert after[f"net.{bn}.num_batches_tracked"] > before[f"net.{bn}.num_batches_tracked"]


def test_bn_stats_all_and_none(cifar_root) -> None:
    before, after = _finetune(cifar_root, "all", SELECTED)
    assert not torch.equal(before["net.layer4.1.bn2.running_mean"], after["net.layer4.1.bn2.running_mean"])
    assert torch.equal(before["net.layer4.1.bn2.weight"], after["net.layer4.1.bn2.weight"])  # still frozen
    before, after = _finetune(cifar_root, "none", SELECTED)
    assert all(torch.equal(before[k], after[k]) for k in before if "running" in k or "num_batches" in k)
    assert not torch.equal(before["net.layer1.1.bn2.weight"], after["net.layer1.1.bn2.weight"])


def test_interpolation_end_points_are_exact() -> None:
    torch.manual_seed(0)
    base, tuned = build_model("resnet18", 10, 4), build_model("resnet18", 10, 4)
    for m in (base, tuned):  # non-trivial BN buffers
        m.train()
        m(torch.rand(8, 3, 32, 32))
    b, t = base.state_dict(), tuned.state_dict()
    for alpha, ref in ((0.0, b), (1.0, t)):
        out = interpolate_state(b, t, alpha)
        assert all(torch.equal(out[k], ref[k]) for k in ref)
    mid = interpolate_state(b, t, 0.3)
    key = "net.layer1.0.bn1.running_var"
    assert torch.allclose(mid[key], 0.7 * b[key] + 0.3 * t[key])


def test_choose_alpha_rule() -> None:
    curve = [
        {"alpha": 0.0, "clean_acc": 50.0, "robust_acc": 30.0},
        {"alpha": 0.5, "clean_acc": 53.0, "robust_acc": 29.9},
        {"alpha": 1.0, "clean_acc": 56.0, "robust_acc": 28.0},
    ]
    assert choose_alpha(curve, 30.0, 0.0)["alpha"] == 0.0
    assert choose_alpha(curve, 30.0, 0.1)["alpha"] == 0.5
    assert choose_alpha(curve, 30.0, 5.0)["alpha"] == 1.0
