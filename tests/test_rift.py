"""RiFT building blocks: MRC projection and values, selection, freezing, BN statistics, interpolation."""

from __future__ import annotations

import copy
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from rift_bn.attacks import PGD
from rift_bn.callbacks import ModuleSelection
from rift_bn.data import CIFARDataModule
from rift_bn.interpolate import choose_alpha, interpolate_state
from rift_bn.models import NormalizedModel, build_model, candidate_modules
from rift_bn.modules import FineTuning, quiet_trainer
from rift_bn.mrc import MRCProtocol, compute_mrc, mrc_reference, project_, select_lowest
from tests.conftest import StagedConvBN, write_fake_cifar10


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


def test_projection_is_per_parameter_tensor() -> None:
    """BN-like weight (large norm) and bias (small norm): each change is bounded by its own tensor's norm.
    A joint projection over both tensors would leave the bias change (case 1) or shrink the weight change
    (case 2); per tensor, the bias goes to its own ball's boundary and the weight is untouched."""
    g = torch.Generator().manual_seed(1)
    w0 = 1.0 + 0.1 * torch.randn(64, generator=g)  # ||w0|| ~ 8
    b0 = 0.01 * torch.randn(64, generator=g)  # ||b0|| ~ 0.08
    for bias_scale in (0.005, 1.0):  # bias change ~0.04 (case 1) or ~8 (case 2), both outside 0.1 ||b0||
        w = w0 + 0.05 * torch.randn(64, generator=g) / 8  # ||dw|| ~ 0.05 < 0.1 ||w0||
        b = b0 + bias_scale * torch.randn(64, generator=g)
        w_before, b_before = w.clone(), b.clone()
        joint_change = torch.cat([w - w0, b - b0]).norm()
        joint_bound = 0.1 * torch.cat([w0, b0]).norm()
        assert (w - w0).norm() < 0.1 * w0.norm() and (b - b0).norm() > 0.1 * b0.norm()
        assert (joint_change <= joint_bound) == (bias_scale < 0.1)  # the two cases a joint ball tells apart
        project_([w, b], [w0, b0], 0.1)
        assert torch.equal(w, w_before)  # inside its own ball: bit-identical
        assert (b - b0).norm().item() == pytest.approx(0.1 * b0.norm().item(), rel=1e-5)
        cos = F.cosine_similarity(b - b0, b_before - b0, dim=0)
        assert cos.item() == pytest.approx(1.0, abs=1e-6)
        for p, p0 in ((w, w0), (b, b0)):
            assert (p - p0).norm() <= 0.1 * p0.norm() * (1 + 1e-6)


KINDS_ALL = ("conv", "linear", "bn")
# bench --quick's MRC setting: a random ResNet-18 (width 4) with calibrated BN statistics, random BN
# affines and a scaled classifier, on 32 random images. Its MRC values lie in 0.2..18 and several robust-
# accuracy drops are non-zero, so a wrong epoch, a wrong drop or a wrong scale cannot hide in float noise.
# (compute_mrc does not care how the set was made; on this net PGD leaves 0 % robust accuracy, no drop.)
CRITICAL_PROTO = MRCProtocol(epochs=2, batch_size=16, eval_batch_size=24, shuffle=False, steps_per_epoch=None)


@pytest.fixture(scope="module")
def critical_fast(critical: tuple[nn.Module, Tensor, Tensor]) -> dict:
    model, x, y = critical
    return compute_mrc(model, x, y, KINDS_ALL, CRITICAL_PROTO)


def test_fast_mrc_equals_the_protocol_as_it_reads(
    critical: tuple[nn.Module, Tensor, Tensor], critical_fast: dict
) -> None:
    model, x, y = critical
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = critical_fast
    ref = mrc_reference(model, x, y, KINDS_ALL, CRITICAL_PROTO)
    assert [r["name"] for r in fast["rows"]] == [r["name"] for r in ref["rows"]] and len(fast["rows"]) == 41
    assert fast["base_loss"] == pytest.approx(ref["base_loss"], rel=1e-6)
    assert fast["base_robust_acc"] == ref["base_robust_acc"] > 0  # a drop can be positive
    for a, b in zip(fast["rows"], ref["rows"], strict=True):
        assert a["mrc"] == pytest.approx(b["mrc"], rel=1e-4, abs=1e-6), a["name"]
        assert a["robust_acc_drop"] == pytest.approx(b["robust_acc_drop"], abs=1e-9)
        assert a["epoch"] == b["epoch"], a["name"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the base is restored
    # the values are substantial, so the comparison above can fail for a wrong protocol
    assert min(r["mrc"] for r in fast["rows"]) > 1e-2
    assert any(r["robust_acc_drop"] > 0 for r in fast["rows"])
    epochs = {r["epoch"] for r in fast["rows"]}
    assert epochs == {1, 2}  # some maxima are not at the last epoch: "last epoch" != "max over epochs"


def test_fast_mrc_equals_the_reference_with_rifts_step_count(
    critical: tuple[nn.Module, Tensor, Tensor],
) -> None:
    """RiFT's 20 shuffled steps per epoch cycle through the set; the fast path takes the same steps."""
    model, x, y = critical
    proto = MRCProtocol(epochs=2, batch_size=12, eval_batch_size=24, steps_per_epoch=7, shuffle=True, seed=1)
    names = ["conv1", "layer2.0.bn2", "layer3.1.conv1", "layer4.1.shortcut.1", "linear"]
    names = [n for n in names if n in dict(model.net.named_modules())]
    fast = compute_mrc(model, x, y, KINDS_ALL, proto, names=names)
    ref = mrc_reference(model, x, y, KINDS_ALL, proto, names=names)
    assert len(fast["rows"]) >= 4
    for a, b in zip(fast["rows"], ref["rows"], strict=True):
        assert a["mrc"] == pytest.approx(b["mrc"], rel=1e-4, abs=1e-6), a["name"]
        assert a["epoch"] == b["epoch"], a["name"]
    one_pass = compute_mrc(model, x, y, KINDS_ALL, replace(proto, steps_per_epoch=None), names=names)
    assert [r["mrc"] for r in one_pass["rows"]] != [r["mrc"] for r in fast["rows"]]  # the steps count


def test_mrc_runs_in_eval_mode_and_restores_a_train_mode_model(
    critical: tuple[nn.Module, Tensor, Tensor], critical_fast: dict
) -> None:
    model, x, y = critical
    trained = copy.deepcopy(model).train()
    trained.net.layer1[0].bn1.eval()  # mixed modes: each module's own flag must come back
    trained.net.linear.weight.requires_grad_(False)  # mixed flags too
    modes = [m.training for m in trained.modules()]
    flags = [p.requires_grad for p in trained.parameters()]
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    out = compute_mrc(trained, x, y, KINDS_ALL, CRITICAL_PROTO)
    assert out == critical_fast  # same rows, base loss and accuracy as the eval-mode model, bit for bit
    after = trained.state_dict()
    assert after.keys() == before.keys() and any("running_mean" in k for k in before)
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats untouched
    assert all(int(before[k]) == int(after[k]) for k in before if k.endswith("num_batches_tracked"))
    assert [m.training for m in trained.modules()] == modes
    assert [p.requires_grad for p in trained.parameters()] == flags


def _oracle_mrc(
    model: nn.Module, x: Tensor, y: Tensor, tensors: list[str], proto: MRCProtocol
) -> tuple[tuple[float, float], list[tuple[float, float]], bool]:
    """DESIGN step 5 by hand, functionally (no module is mutated): from the base weights, per batch one
    plain SGD ascent step ``W += lr * grad(mean CE of the batch)`` on ``tensors`` only; after each epoch
    each tensor's change is scaled into ||dW|| <= eps ||W||, then loss and accuracy over the whole set in
    one pass. Returns (base loss, base acc), per-epoch (loss, acc) and whether a projection was active."""
    net = copy.deepcopy(model).eval()
    state = dict(net.state_dict())

    def evaluate(w: dict[str, Tensor]) -> tuple[float, float]:
        with torch.no_grad():
            logits = functional_call(net, {**state, **w}, (x,))
        return F.cross_entropy(logits, y).item(), 100.0 * (logits.argmax(1) == y).double().mean().item()

    w0 = {k: state[k].detach().clone() for k in tensors}
    w = dict(w0)
    generator = torch.Generator().manual_seed(proto.seed)
    batches: list[Tensor] = []  # the stream of batches: pass after pass, each a fresh permutation

    def next_batch() -> Tensor:
        if not batches:
            order = torch.randperm(len(y), generator=generator) if proto.shuffle else torch.arange(len(y))
            batches.extend(order.split(proto.batch_size))
        return batches.pop(0)

    steps = proto.steps_per_epoch or -(-len(y) // proto.batch_size)
    trace, projected = [], False
    for _ in range(proto.epochs):
        for idx in (next_batch() for _ in range(steps)):
            leaves = {k: v.clone().requires_grad_(True) for k, v in w.items()}
            loss = F.cross_entropy(functional_call(net, {**state, **leaves}, (x[idx],)), y[idx])
            grads = torch.autograd.grad(loss, list(leaves.values()))
            w = {k: (v + proto.lr * g).detach() for (k, v), g in zip(leaves.items(), grads, strict=True)}
        for k in w:
            change, bound = w[k] - w0[k], proto.epsilon * w0[k].norm()
            if change.norm() > bound:
                w[k], projected = w0[k] + change * (bound / change.norm()), True
        trace.append(evaluate(w))
    return evaluate({}), trace, projected


@pytest.mark.parametrize(("shuffle", "steps"), [(False, None), (True, None), (True, 5), (False, 3)])
def test_exact_mrc_equals_a_hand_written_float64_oracle(shuffle: bool, steps: int | None) -> None:
    """``steps``: ascent steps per epoch (RiFT's 20 over 10,000 examples); 5 and 3 over 2 batches a pass
    cross pass boundaries inside an epoch and carry a half-used pass into the next epoch."""
    torch.manual_seed(0)
    model = NormalizedModel(StagedConvBN()).double()
    with torch.no_grad():
        model.net.bn.weight.uniform_(0.5, 1.5)
        model.net.bn.bias.normal_(0, 0.3)
        model.net.bn.running_mean.normal_(0, 0.2)
        model.net.bn.running_var.uniform_(0.5, 2.0)
        model.net.fc.weight.mul_(3.0)
    model.eval()
    x = torch.rand(10, 3, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:3] = (y[:3] + 1) % 5  # base accuracy 70 %: room for drops
    # batches of 6 + 4 (mean CE per batch, not per example), evaluation in chunks of 4 + 4 + 2
    proto = MRCProtocol(
        epsilon=0.1,
        epochs=3,
        lr=1.0,
        batch_size=6,
        shuffle=shuffle,
        seed=3,
        eval_batch_size=4,
        steps_per_epoch=steps,
    )
    out = compute_mrc(model, x, y, KINDS_ALL, proto)
    tensors = {"conv": ["net.conv.weight"], "bn": ["net.bn.weight", "net.bn.bias"], "fc": ["net.fc.weight"]}
    assert [r["name"] for r in out["rows"]] == list(tensors)
    discriminating, any_drop, any_projection = False, False, False
    for row in out["rows"]:
        (base_loss, base_acc), trace, projected = _oracle_mrc(model, x, y, tensors[row["name"]], proto)
        best = max(range(proto.epochs), key=lambda e: (trace[e][0], -e))  # first maximum
        assert out["base_loss"] == pytest.approx(base_loss, rel=1e-12)
        assert out["base_robust_acc"] == pytest.approx(base_acc, abs=1e-9)
        assert row["mrc"] == pytest.approx(trace[best][0] - base_loss, abs=1e-12), row["name"]
        assert row["robust_acc_drop"] == pytest.approx(base_acc - trace[best][1], abs=1e-9), row["name"]
        assert row["epoch"] == best + 1
        discriminating |= best < proto.epochs - 1 and trace[best][1] != trace[-1][1]
        any_drop |= row["robust_acc_drop"] > 0
        any_projection |= projected
    # the setting tells "max over epochs" from "last epoch", and "drop at the best epoch" from "at the last"
    assert any_projection and (steps is not None or (discriminating and any_drop))


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


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CIFAR-10 layout written here (freezing does not need real images; no skip without them)."""
    root = tmp_path_factory.mktemp("fake_cifar")
    write_fake_cifar10(root, n_train=300, n_test=20)
    return root


def _finetune(root: Path, bn_stats: str, selected: list[str]) -> tuple[dict, dict]:
    dm = CIFARDataModule(
        "cifar10",
        root,
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


def test_frozen_parameters_and_bn_statistics(fake_cifar: Path) -> None:
    before, after = _finetune(fake_cifar, "selected", SELECTED)
    for key in before:
        module = key.rsplit(".", 1)[0].removeprefix("net.")
        if module in SELECTED:
            if key.endswith(("weight", "bias", "running_mean", "running_var")):
                assert not torch.equal(before[key], after[key]), f"{key} should have changed"
        else:  # every other parameter and BN buffer bit-identical
            assert torch.equal(before[key], after[key]), f"{key} changed"
    for bn in SELECTED_BN:
        assert after[f"net.{bn}.num_batches_tracked"] > before[f"net.{bn}.num_batches_tracked"]


def test_bn_stats_all_and_none(fake_cifar: Path) -> None:
    before, after = _finetune(fake_cifar, "all", SELECTED)
    assert not torch.equal(before["net.layer4.1.bn2.running_mean"], after["net.layer4.1.bn2.running_mean"])
    assert torch.equal(before["net.layer4.1.bn2.weight"], after["net.layer4.1.bn2.weight"])  # still frozen
    before, after = _finetune(fake_cifar, "none", SELECTED)
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


def test_interpolation_is_the_two_product_formula_and_integers_take_the_nearer_end() -> None:
    g = torch.Generator().manual_seed(0)
    base = {
        "w": torch.randn(5, 3, generator=g),
        "running_var": torch.rand(7, generator=g, dtype=torch.float64) + 0.5,
        "num_batches_tracked": torch.tensor(3),
    }
    tuned = {
        "w": torch.randn(5, 3, generator=g),
        "running_var": torch.rand(7, generator=g, dtype=torch.float64) + 0.5,
        "num_batches_tracked": torch.tensor(10),
    }
    for alpha in (0.0, 0.1, 0.3, 0.49, 0.5, 0.7, 1.0):
        out = interpolate_state(base, tuned, alpha)
        assert out.keys() == base.keys()
        for key in ("w", "running_var"):
            assert out[key].dtype == base[key].dtype
            assert torch.equal(out[key], (1 - alpha) * base[key] + alpha * tuned[key]), (key, alpha)
        n = out["num_batches_tracked"]
        assert n.dtype == torch.int64 and int(n) == (10 if alpha >= 0.5 else 3), alpha  # a tie goes to tuned
        assert n.data_ptr() not in (
            base["num_batches_tracked"].data_ptr(),
            tuned["num_batches_tracked"].data_ptr(),
        )
    for alpha, end in ((0.0, base), (1.0, tuned)):  # the end points themselves, bit for bit
        out = interpolate_state(base, tuned, alpha)
        for key in base:
            assert torch.equal(out[key], end[key]) and out[key].dtype == end[key].dtype, (key, alpha)
            assert (
                out[key].reshape(-1).view(torch.uint8).tolist()
                == end[key].reshape(-1).view(torch.uint8).tolist()
            )


def test_choose_alpha_fallback_and_tie_breaks() -> None:
    def point(alpha: float, clean: float, robust: float) -> dict[str, float]:
        return {"alpha": alpha, "clean_acc": clean, "robust_acc": robust}

    # no point within tolerance: the smallest alpha (the AT end), even if another point is more robust
    curve = [point(0.2, 51.0, 27.0), point(0.6, 55.0, 29.0), point(1.0, 58.0, 25.0)]
    for order in (curve, curve[::-1]):
        assert choose_alpha(order, 30.0, 0.5) == curve[0]
    # ties in clean accuracy: the more robust point; then the smaller alpha; the order of the curve is moot
    curve = [
        point(0.0, 50.0, 30.0),
        point(0.3, 54.0, 29.5),
        point(0.5, 54.0, 29.8),
        point(0.7, 54.0, 29.8),
        point(0.9, 55.0, 28.0),  # best clean, outside tolerance
    ]
    for seed in range(5):
        shuffled = curve[:]
        random.Random(seed).shuffle(shuffled)
        assert choose_alpha(shuffled, 30.0, 1.0) == point(0.5, 54.0, 29.8)
    assert choose_alpha(curve, 30.0, 2.0)["alpha"] == 0.9
