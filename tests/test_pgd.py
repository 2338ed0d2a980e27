"""Our PGD: bit-identical to torchattacks.PGD, inside the ball, restartable, safe in every grad context."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
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


def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cross-entropy of the (eval-mode) model in float32: what the attack ascends."""
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


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
    # The steps did the work, not the random start: the loss rose well beyond where they began.
    start = ours(model, x, y, random_start=random_start, steps=0)
    assert loss(model, a, y) - loss(model, start, y) > 0.01
    assert abs(loss(model, start, y) - loss(model, x, y)) < 0.001


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
    adv = ours(model, x, y, random_start=random_start, steps=4, alpha=0.05)
    assert_in_ball(adv, x)
    assert loss(model, adv, y) - loss(model, ours(model, x, y, random_start=random_start, steps=0), y) > 0.01


def test_zero_steps_is_the_random_start(model: nn.Module) -> None:
    x, y = batch(8)
    assert torch.equal(ours(model, x, y, steps=0, random_start=False), x)
    start = ours(model, x, y, steps=0)
    assert_in_ball(start, x)
    assert not torch.equal(start, x)


def test_restarts_strictly_stronger_and_keep_the_first_success(model: nn.Module) -> None:
    x, _ = batch(32, seed=6)
    with torch.no_grad():
        y = model(x).argmax(1)  # clean accuracy 100%: the attack has something to fool
    # A wide ball and short steps: where the attack lands depends on the random start, so restarts matter.
    weak = {"eps": 32 / 255, "alpha": 1 / 255, "steps": 2}

    def acc(adv: torch.Tensor) -> float:
        with torch.no_grad():
            return (model(adv).argmax(1) == y).float().mean().item()

    one, three = ours(model, x, y, **weak), ours(model, x, y, restarts=3, **weak)
    assert_in_ball(three, x, weak["eps"])
    assert acc(three) <= acc(one)
    assert acc(one) - acc(three) >= 4 / 32  # strictly (and clearly) stronger: 20 -> 14 of 32 survive
    fooled = model(one).argmax(1) != y
    assert torch.equal(three[fooled], one[fooled])  # the first restart's successes are kept

    # The documented combination, by hand from single-restart runs: the RNG runs on from one restart
    # to the next, each restart attacks only the images no earlier restart fooled, and an image keeps
    # the first restart that fooled it (the last restart's image if none did).
    torch.manual_seed(7)
    single = PGD(**weak)
    expected = single(model, x, y)
    with torch.no_grad():
        fooled = model(expected).argmax(1) != y
    for _ in range(2):
        todo = ~fooled
        adv = single(model, x[todo], y[todo])
        with torch.no_grad():
            expected[todo] = adv
            fooled[todo] = model(adv).argmax(1) != y[todo]
    assert torch.equal(three, expected)
    assert acc(expected) == 1 - fooled.float().mean().item()


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
    # bf16 gradients differ in sign here and there, but the attack does what the float32 one does:
    # it raises the (float32) loss about as much, from the same random start.
    start, fp32 = ours(model, x, y, steps=0), ours(model, x, y)
    gain, gain32 = loss(model, adv, y) - loss(model, start, y), loss(model, fp32, y) - loss(model, start, y)
    assert gain32 > 0.01 and gain >= 0.8 * gain32
    assert (adv == fp32).float().mean() >= 0.5  # most pixels land on the same value as in float32


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
    start = ours(model, x, y, steps=0)
    eager = copy.deepcopy(model)  # scores the images without further compiles
    model.net.compile(backend="aot_eager")
    try:
        adv = ours(model, x, y, steps=3)
        assert_in_ball(adv, x)
        assert (adv - expected).abs().max() <= 2 * ALPHA * 3  # same attack up to sign flips of float noise
        # The same attack, not merely some 3-step signed walk from the same start: (nearly) every pixel
        # lands on the eager value (compiled kernels may flip the sign of a near-zero gradient), and the
        # loss rises as far as the eager attack's, well above the random start's.
        assert (adv == expected).float().mean() >= 0.99
        gain = loss(eager, expected, y) - loss(eager, start, y)
        assert gain > 0.003
        assert loss(eager, adv, y) - loss(eager, start, y) >= gain - 1e-4
        model.train()
        ours(model, x, y, steps=1)  # train -> eval switch inside the attack recompiles, and works
    finally:
        torch._dynamo.reset()
