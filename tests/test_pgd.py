"""Our PGD: bit-identical to torchattacks.PGD, inside the ball, restartable, safe in every grad context."""

from __future__ import annotations

import pytest
import torch
import torchattacks
from torch import nn

from rift_bn.attacks import PGD
from rift_bn.models import build_model

EPS, ALPHA = 8 / 255, 2 / 255


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # fast and stable on a shared 2-core machine
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", 10, 8).eval()


def batch(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=g)
    x[0, 0, :4] = 0.0  # pixels on the box edges, where clamping matters
    x[1, 1, :4] = 1.0
    return x, torch.randint(0, 10, (n,), generator=g)


def ours(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = 7, **kw) -> torch.Tensor:
    torch.manual_seed(seed)
    return PGD(**{"eps": EPS, "alpha": ALPHA, "steps": 10, **kw})(model, x, y)


def theirs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = 7, **kw) -> torch.Tensor:
    torch.manual_seed(seed)
    return torchattacks.PGD(model, **{"eps": EPS, "alpha": ALPHA, "steps": 10, **kw})(x, y)


def assert_in_ball(adv: torch.Tensor, x: torch.Tensor, eps: float = EPS) -> None:
    assert adv.dtype == x.dtype and adv.shape == x.shape
    assert (adv - x).abs().max() <= eps + 1e-7
    assert adv.min() >= 0 and adv.max() <= 1


@pytest.mark.parametrize("random_start", [True, False])
def test_identical_to_torchattacks(model: nn.Module, random_start: bool) -> None:
    x, y = batch(24)
    a = ours(model, x, y, random_start=random_start)
    b = theirs(model, x, y, random_start=random_start)
    assert torch.equal(a, b)
    assert not torch.equal(a, x)


def test_identical_for_other_settings(model: nn.Module) -> None:
    x, y = batch(16, seed=3)
    for kw in ({"steps": 1}, {"steps": 3, "alpha": 0.0261}, {"eps": 4 / 255, "alpha": 1 / 255, "steps": 5}):
        assert torch.equal(ours(model, x, y, **kw), theirs(model, x, y, **kw)), kw


def test_identical_on_train_mode_model_with_grads(model: nn.Module) -> None:
    """torchattacks switches to eval itself and keeps parameter gradients on: same images as ours."""
    x, y = batch(16, seed=4)
    model.train()
    try:
        assert torch.equal(ours(model, x, y), theirs(model, x, y))
    finally:
        model.eval()


@pytest.mark.parametrize("random_start", [True, False])
def test_stays_in_ball_and_box(model: nn.Module, random_start: bool) -> None:
    x, y = batch(32, seed=5)
    assert_in_ball(ours(model, x, y, random_start=random_start, steps=4, alpha=0.05), x)


def test_zero_steps_is_the_random_start(model: nn.Module) -> None:
    x, y = batch(8)
    assert torch.equal(ours(model, x, y, steps=0, random_start=False), x)
    start = ours(model, x, y, steps=0)
    assert_in_ball(start, x)
    assert not torch.equal(start, x)


def test_restarts_at_least_as_strong(model: nn.Module) -> None:
    x, _ = batch(32, seed=6)
    with torch.no_grad():
        y = model(x).argmax(1)  # clean accuracy 100%: the attack has something to fool
    weak = {"eps": 0.5 / 255, "alpha": 0.25 / 255, "steps": 2}

    def acc(adv: torch.Tensor) -> float:
        with torch.no_grad():
            return (model(adv).argmax(1) == y).float().mean().item()

    one, three = ours(model, x, y, **weak), ours(model, x, y, restarts=3, **weak)
    assert_in_ball(three, x, weak["eps"])
    assert acc(three) <= acc(one)
    fooled = model(one).argmax(1) != y
    assert torch.equal(three[fooled], one[fooled])  # the first restart's successes are kept


@pytest.mark.parametrize("context", ["inference_mode", "no_grad"])
def test_inside_validation_contexts(model: nn.Module, context: str) -> None:
    x, y = batch(16)
    expected = ours(model, x, y)
    ctx = torch.inference_mode() if context == "inference_mode" else torch.no_grad()
    with ctx:
        xi, yi = x.clone(), y.clone()  # under inference_mode these are inference tensors, as in validation
        adv = ours(model, xi, yi)
        assert torch.is_grad_enabled() is False
    assert torch.equal(adv, expected)


def test_restores_flags_and_modes(model: nn.Module) -> None:
    x, y = batch(8)
    model.train()
    model.net.bn1.eval()  # a mixed state (as during fine-tuning with bn_stats=selected)
    model.net.conv1.weight.requires_grad_(False)
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        ours(model, x, y, steps=2)
        assert {n: m.training for n, m in model.named_modules()} == modes
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.net.conv1.weight.requires_grad_(True)
        model.eval()


def test_under_bf16_autocast(model: nn.Module) -> None:
    x, y = batch(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        adv = ours(model, x, y)
        with torch.no_grad():
            assert model(adv).dtype == torch.bfloat16  # the model really ran in bf16
    assert_in_ball(adv, x)
    assert not torch.equal(adv, x)


def test_channels_last_model_and_input(model: nn.Module) -> None:
    """model.channels_last=true: same images as torchattacks on that same model."""
    x, y = batch(16)
    cl = build_model("resnet18", 10, 8).eval()
    cl.load_state_dict(model.state_dict())
    cl.to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    a, b = ours(cl, xc, y), theirs(cl, xc, y)
    assert torch.equal(a, b)
    assert_in_ball(a, x)


def test_compiled_network() -> None:
    """model.compile=true compiles ``model.net`` in place; the attack runs through it (aot_eager: fast)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model("resnet18", 10, 4).eval()
    x, y = batch(8)
    expected = ours(model, x, y, steps=3)
    model.net.compile(backend="aot_eager")
    try:
        adv = ours(model, x, y, steps=3)
        assert_in_ball(adv, x)
        assert (adv - expected).abs().max() <= 2 * ALPHA * 3  # same attack up to sign flips of float noise
        model.train()
        ours(model, x, y, steps=1)  # train -> eval switch inside the attack recompiles, and works
    finally:
        torch._dynamo.reset()
