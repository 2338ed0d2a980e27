"""Architectures: shapes, published state-dict naming, normalisation, stages() and candidate modules."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from rift_bn.models import (
    ARCHITECTURES,
    CIFAR_MEAN,
    CIFAR_STD,
    Normalize,
    NormalizedModel,
    PreActResNet18,
    ResNet18,
    WideResNet,
    build_model,
    candidate_modules,
)

SMALL_NETS = {
    "resnet18": lambda num_classes=10: ResNet18(num_classes=num_classes, width=8),
    "preact_resnet18": lambda num_classes=10: PreActResNet18(num_classes=num_classes, width=8),
    "wrn": lambda num_classes=10: WideResNet(depth=10, num_classes=num_classes, width=1),
}


def _bn_keys(prefix: str) -> list[str]:
    return [f"{prefix}.{s}" for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def _randomize_bn(model: nn.Module) -> None:
    """Give BN non-trivial running statistics so eval-mode comparisons are meaningful."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


@pytest.mark.parametrize("name", sorted(SMALL_NETS))
@pytest.mark.parametrize("num_classes", [10, 100])
def test_output_shapes(name: str, num_classes: int) -> None:
    torch.manual_seed(0)
    net = SMALL_NETS[name](num_classes)
    out = net(torch.rand(3, 3, 32, 32))
    assert out.shape == (3, num_classes)
    assert torch.isfinite(out).all()


def test_resnet18_published_keys() -> None:
    sd = ResNet18(num_classes=10, width=64).state_dict()
    expected = ["conv1.weight", *_bn_keys("bn1")]
    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}"
            expected += [
                f"{p}.conv1.weight",
                *_bn_keys(f"{p}.bn1"),
                f"{p}.conv2.weight",
                *_bn_keys(f"{p}.bn2"),
            ]
            if layer > 1 and block == 0:
                expected += [f"{p}.shortcut.0.weight", *_bn_keys(f"{p}.shortcut.1")]
    expected += ["linear.weight", "linear.bias"]
    assert list(sd) == expected
    assert len(sd) == 122
    assert sd["conv1.weight"].shape == (64, 3, 3, 3)
    assert sd["layer1.0.conv1.weight"].shape == (64, 64, 3, 3)
    assert sd["layer2.0.conv1.weight"].shape == (128, 64, 3, 3)
    assert sd["layer2.0.shortcut.0.weight"].shape == (128, 64, 1, 1)
    assert sd["layer2.0.shortcut.1.running_var"].shape == (128,)
    assert sd["layer4.1.bn2.weight"].shape == (512,)
    assert sd["linear.weight"].shape == (10, 512)
    assert not any(k.startswith("layer1.0.shortcut") for k in sd)
    net = ResNet18(width=64)
    assert net.layer2[0].shortcut[0].stride == (2, 2) and net.layer2[0].shortcut[0].bias is None
    assert all(m.bias is None for m in net.modules() if isinstance(m, nn.Conv2d))
    assert net.conv1.stride == (1, 1) and net.conv1.kernel_size == (3, 3)


def test_preact_resnet18_published_keys() -> None:
    sd = PreActResNet18(num_classes=10, width=64).state_dict()
    expected = ["conv1.weight"]
    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}"
            expected += [
                *_bn_keys(f"{p}.bn1"),
                f"{p}.conv1.weight",
                *_bn_keys(f"{p}.bn2"),
                f"{p}.conv2.weight",
            ]
            if layer > 1 and block == 0:
                expected.append(f"{p}.shortcut.0.weight")
    expected += [*_bn_keys("bn"), "linear.weight", "linear.bias"]
    assert list(sd) == expected
    assert sd["layer2.0.shortcut.0.weight"].shape == (128, 64, 1, 1)
    assert sd["layer1.0.bn1.weight"].shape == (64,)
    assert sd["bn.weight"].shape == (512,)
    assert sd["linear.weight"].shape == (10, 512)


def test_wrn34_10_published_keys() -> None:
    with torch.device("meta"):
        sd = WideResNet(depth=34, num_classes=10, width=10).state_dict()
    assert "sub_block1.layer.0.conv1.weight" not in sd
    for b, (cin, cout) in enumerate([(16, 160), (160, 320), (320, 640)], start=1):
        assert sd[f"block{b}.layer.0.convShortcut.weight"].shape == (cout, cin, 1, 1)
        assert sd[f"block{b}.layer.0.bn1.weight"].shape == (cin,)
        assert sd[f"block{b}.layer.0.conv1.weight"].shape == (cout, cin, 3, 3)
        assert sd[f"block{b}.layer.0.bn2.running_mean"].shape == (cout,)
        assert sd[f"block{b}.layer.4.conv2.weight"].shape == (cout, cout, 3, 3)
        assert f"block{b}.layer.5.conv1.weight" not in sd
        assert f"block{b}.layer.1.convShortcut.weight" not in sd
    assert list(sd)[:2] == ["conv1.weight", "block1.layer.0.bn1.weight"]
    assert list(sd)[-7:] == [*_bn_keys("bn1"), "fc.weight", "fc.bias"]
    assert sd["fc.weight"].shape == (10, 640)
    assert not any("relu" in k for k in sd)
    n_params = sum(v.numel() for k, v in sd.items() if "running" not in k and "num_batches" not in k)
    assert n_params == 46_160_474  # the well-known WRN-34-10 size


def test_wrn_same_width_block_has_no_shortcut() -> None:
    sd = WideResNet(depth=10, width=1).state_dict()
    assert "block1.layer.0.convShortcut.weight" not in sd  # 16 -> 16 channels
    assert "block2.layer.0.convShortcut.weight" in sd
    with pytest.raises(ValueError, match="depth=12"):
        WideResNet(depth=12)


def test_normalization_buffers_not_in_state_dict() -> None:
    model = NormalizedModel(ResNet18(width=8))
    assert model.normalize.mean.shape == (1, 3, 1, 1)
    assert model.normalize.std.shape == (1, 3, 1, 1)
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor(CIFAR_MEAN))
    assert torch.allclose(model.normalize.std.flatten(), torch.tensor(CIFAR_STD))
    keys = list(model.state_dict())
    assert all(k.startswith("net.") for k in keys)
    assert [k.removeprefix("net.") for k in keys] == list(model.net.state_dict())
    assert dict(model.named_buffers())["normalize.mean"] is model.normalize.mean  # still a buffer (moves)


def test_normalized_model_forward() -> None:
    torch.manual_seed(0)
    model = NormalizedModel(ResNet18(width=8)).eval()
    x = torch.rand(2, 3, 32, 32)
    expected = model.net(
        (x - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    )
    torch.testing.assert_close(model(x), expected)
    assert torch.equal(Normalize()(x), model.normalize(x))


@pytest.mark.parametrize("name", sorted(SMALL_NETS))
def test_stages_compose_to_forward(name: str) -> None:
    torch.manual_seed(0)
    model = NormalizedModel(SMALL_NETS[name]())
    _randomize_bn(model)
    model.eval()
    x = torch.rand(4, 3, 32, 32)
    keys_before = list(model.state_dict())
    with torch.no_grad():
        composed = functools.reduce(lambda h, s: s(h), model.stages(), x)
        net_composed = functools.reduce(lambda h, s: s(h), model.net.stages(), model.normalize(x))
        assert torch.equal(composed, model(x))
        assert torch.equal(net_composed, model(x))
    # Stages add no state to the model and share (not copy) its parameters.
    assert list(model.state_dict()) == keys_before
    model_params = {id(p) for p in model.parameters()}
    stage_params = [p for s in model.stages() for p in s.parameters()]
    assert {id(p) for p in stage_params} == model_params
    assert len(stage_params) == len(model_params)
    assert model.stages()[0] is model.normalize
    # named_stages prefixes map stage parameter names back to the model's names.
    named = dict(model.named_parameters())
    for prefix, stage in model.named_stages():
        for pname, p in stage.named_parameters():
            assert named[f"{prefix}.{pname}"] is p


def test_stages_respect_train_mode_and_gradients() -> None:
    torch.manual_seed(0)
    model = NormalizedModel(ResNet18(width=8)).train()
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    out = functools.reduce(lambda h, s: s(h), model.stages(), x)
    out.sum().backward()
    assert x.grad is not None and model.net.conv1.weight.grad is not None


def test_build_model() -> None:
    torch.manual_seed(0)
    m = build_model("resnet18", num_classes=100, width=8)
    assert isinstance(m, NormalizedModel) and isinstance(m.net, ResNet18().__class__)
    assert m.net.linear.weight.shape == (100, 64)
    assert build_model("preact_resnet18", 10, width=4).net.bn.num_features == 32
    assert build_model("resnet18", 10).net.conv1.out_channels == 64
    assert ARCHITECTURES["wrn34_10"].default_width == 10
    assert set(ARCHITECTURES) == {"resnet18", "preact_resnet18", "wrn34_10"}


def test_build_model_unknown_name() -> None:
    with pytest.raises(ValueError) as info:
        build_model("foo", 10)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("model=foo")
    for name in ("resnet18", "preact_resnet18", "wrn34_10"):
        assert name in msg


def test_candidate_modules_resnet18() -> None:
    model = build_model("resnet18", 10, width=8)
    convs = candidate_modules(model, {"conv"})
    assert len(convs) == 20
    assert sum(1 for name, _, _ in convs if "shortcut" in name) == 3
    assert len(candidate_modules(model, {"linear"})) == 1
    assert len(candidate_modules(model, {"bn"})) == 20
    everything = candidate_modules(model, {"conv", "linear", "bn"})
    assert len(everything) == 41
    assert everything[0][0] == "conv1" and everything[0][2] == "conv"
    assert everything[-1] == ("linear", model.net.linear, "linear")
    assert ("layer2.0.shortcut.1", model.net.layer2[0].shortcut[1], "bn") in everything
    order = [name for name, _ in model.net.named_modules()]
    assert [n for n, _, _ in everything] == [n for n in order if n in {e[0] for e in everything}]
    assert all(not n.startswith("net.") for n, _, _ in everything)
    assert candidate_modules(model, set()) == []
    with pytest.raises(ValueError, match="unknown module kind"):
        candidate_modules(model, {"attention"})


def test_candidate_modules_other_architectures() -> None:
    preact = build_model("preact_resnet18", 10, width=4)
    assert len(candidate_modules(preact, {"conv"})) == 20
    assert len(candidate_modules(preact, {"bn"})) == 17  # 2 per block + final bn
    wrn = NormalizedModel(WideResNet(depth=16, width=1))
    kinds = [k for _, _, k in candidate_modules(wrn, {"conv", "linear", "bn"})]
    assert kinds.count("conv") == 1 + 2 * 6 + 2  # stem, 6 blocks, 2 shortcuts (block1 is 16 -> 16)
    assert kinds.count("bn") == 2 * 6 + 1
    assert kinds.count("linear") == 1
