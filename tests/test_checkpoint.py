"""Checkpoint import/export: wrapper and prefix variants, mismatches, and refusal of pickled code."""

from __future__ import annotations

import os
import shlex
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import Tensor

from rift_bn.models import NormalizedModel, ResNet18, WideResNet, build_model
from rift_bn.models.checkpoint import (
    CheckpointError,
    file_sha256,
    load_into,
    read_state_dict,
    save_state_dict,
)


def _source_model(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("resnet18", num_classes=10, width=8)
    with torch.no_grad():  # non-default BN statistics, so a round trip really has to carry them
        for name, buf in model.net.named_buffers():
            if "running" in name:
                buf.uniform_(0.5, 1.5)
            elif "num_batches_tracked" in name:
                buf.fill_(7)
    return model


def _assert_identical(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def _prefixed(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def _variants(sd: dict[str, Tensor]) -> dict[str, object]:
    return {
        "raw": dict(sd),
        "ordered": OrderedDict(sd),
        "state_dict": {"state_dict": sd},
        "model": {"model": sd, "epoch": 3},
        "net": {"net": sd},
        "model_state_dict": {
            "model_state_dict": sd,
            "optimizer_state_dict": {"state": {}, "param_groups": []},
        },
        "nested": {"state_dict": {"model": sd}},
        "module_prefix": _prefixed(sd, "module."),
        "wrapped_module_prefix": {"state_dict": _prefixed(sd, "module.")},
        "net_prefix_with_norm": {
            **_prefixed(sd, "net."),
            "normalize.mean": torch.zeros(1, 3, 1, 1),
            "normalize.std": torch.ones(1, 3, 1, 1),
        },
        "mu_sigma": {**sd, "mu": torch.zeros(1, 3, 1, 1), "sigma": torch.ones(1, 3, 1, 1)},
        "compiled": _prefixed(sd, "_orig_mod."),
        "lightning": {
            "epoch": 12,
            "global_step": 4800,
            "pytorch-lightning_version": "2.5.0",
            "state_dict": _prefixed(sd, "model.net."),
            "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 12}}}},
            "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_path": "", "best_k_models": {}}},
            "optimizer_states": [{"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": []}],
            "lr_schedulers": [{"last_epoch": 12, "base_lrs": [0.1]}],
            "hyper_parameters": {"lr": 0.1, "model": {"name": "resnet18", "width": 8}, "epochs": 20},
        },
        "lightning_compiled": {"state_dict": _prefixed(sd, "model._orig_mod.net."), "epoch": 1},
    }


VARIANT_NAMES = list(_variants({}))


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_import_variants_round_trip(tmp_path: Path, variant: str) -> None:
    source = _source_model()
    sd = source.net.state_dict()
    path = tmp_path / f"{variant}.pt"
    torch.save(_variants(sd)[variant], path)

    loaded = read_state_dict(path)
    _assert_identical(loaded, dict(sd))

    target = _source_model(seed=1)
    assert not torch.equal(target.net.conv1.weight, source.net.conv1.weight)
    load_into(target, loaded)
    _assert_identical(target.net.state_dict(), dict(sd))
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(target.eval()(x), source.eval()(x))


def test_save_and_read_round_trip(tmp_path: Path) -> None:
    source = _source_model()
    path = tmp_path / "sub" / "base.pt"
    save_state_dict(source, path)
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["base.pt"]  # no temp file left behind
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert list(raw) == list(source.net.state_dict())  # published naming, no "net." prefix
    target = _source_model(seed=1)
    load_into(target, read_state_dict(path))
    _assert_identical(target.net.state_dict(), dict(source.net.state_dict()))
    # Overwriting is atomic and leaves exactly the new file.
    save_state_dict(target, path)
    assert [p.name for p in path.parent.iterdir()] == ["base.pt"]


def test_file_sha256(tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "blob.bin"
    data = os.urandom(3 * (1 << 20) + 17)
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    assert file_sha256(str(path)) == hashlib.sha256(data).hexdigest()


def test_missing_num_batches_tracked_is_tolerated(tmp_path: Path) -> None:
    source = _source_model()
    sd = {k: v for k, v in source.net.state_dict().items() if not k.endswith("num_batches_tracked")}
    target = _source_model(seed=1)
    load_into(target, sd)
    assert torch.equal(target.net.conv1.weight, source.net.conv1.weight)


def test_trades_wrn_checkpoint_with_its_unused_sub_block_imports(tmp_path: Path) -> None:
    """TRADES/RiFT WideResNet checkpoints carry ``sub_block1.*`` (built, never used): ignored on import."""
    torch.manual_seed(0)
    source = WideResNet(depth=10, width=1)
    published = {f"module.{k}": v for k, v in source.state_dict().items()}  # DataParallel-saved
    extra = {
        k.replace("block1.", "sub_block1.", 1): v + 1
        for k, v in source.state_dict().items()
        if k.startswith("block1.")
    }
    published |= {f"module.{k}": v for k, v in extra.items()}
    path = tmp_path / "trades_wrn.pt"
    torch.save(published, path)
    target = NormalizedModel(WideResNet(depth=10, width=1))
    load_into(target, read_state_dict(path))
    assert all(torch.equal(v, target.net.state_dict()[k]) for k, v in source.state_dict().items())
    with pytest.raises(CheckpointError, match="unexpected"):  # only that block is forgiven
        load_into(target, {**source.state_dict(), "sub_block2.conv.weight": torch.zeros(1)})


def test_architecture_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "wrn.pt"
    torch.save(WideResNet(depth=10, width=1).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        load_into(build_model("resnet18", 10, width=8), read_state_dict(path))
    msg = str(info.value)
    assert "\n" not in msg
    assert "missing" in msg and "unexpected" in msg
    assert "model=" in msg and "model.width=" in msg and "data=" in msg


@pytest.mark.parametrize(
    ("width", "num_classes", "needle"),
    [(16, 10, "conv1.weight"), (8, 100, "linear.weight")],
)
def test_shape_mismatch(tmp_path: Path, width: int, num_classes: int, needle: str) -> None:
    path = tmp_path / "r.pt"
    torch.save(ResNet18(num_classes=10, width=8).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        load_into(build_model("resnet18", num_classes, width=width), read_state_dict(path))
    msg = str(info.value)
    assert "\n" not in msg and needle in msg and "shape" in msg and "model.width=" in msg


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    msg = str(info.value)
    assert msg.startswith(f"base.checkpoint={path}: file not found")
    assert "base.checkpoint=null" in msg and "\n" not in msg


@pytest.mark.parametrize("content", [b"", b"definitely not a checkpoint", b"PK\x03\x04truncated-zip"])
def test_corrupt_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    msg = str(info.value)
    assert str(path) in msg and "unreadable or corrupt" in msg and "refused" not in msg and "\n" not in msg


def test_truncated_real_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "trunc.pt"
    torch.save(ResNet18(width=8).state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="unreadable or corrupt"):
        read_state_dict(path)


@pytest.mark.parametrize("payload", [[1, 2, 3], torch.zeros(3), {"epoch": 3, "note": "no tensors"}])
def test_not_a_state_dict(tmp_path: Path, payload: object) -> None:
    path = tmp_path / "odd.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError):
        read_state_dict(path)


class _OpenPayload:
    """Unpickling this would create ``marker`` via ``open(marker, "w")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _SystemPayload:
    """Unpickling this would run a shell command creating ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


@pytest.mark.parametrize("payload_cls", [_OpenPayload, _SystemPayload])
@pytest.mark.parametrize("wrapped", [False, True])
def test_malicious_checkpoint_refused(tmp_path: Path, payload_cls: type, wrapped: bool) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = payload_cls(marker)
    obj = {"state_dict": ResNet18(width=8).state_dict(), "extra": payload} if wrapped else payload
    torch.save(obj, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    msg = str(info.value)
    assert str(path) in msg and "refused" in msg and "pickled" in msg and "\n" not in msg
    assert not marker.exists()
