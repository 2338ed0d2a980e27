"""RiFT's protocol where we used to drift: data in every key, float32 evaluation, the selection split of a
published checkpoint, alpha = 1 evaluated like every alpha (docs/fidelity.md)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from rift_bn.data import CIFARDataModule, DataError, load_cifar
from rift_bn.interpolate import interpolate_state, interpolation_curve
from rift_bn.models import build_model
from rift_bn.pipeline.evaluation import Evaluator
from rift_bn.seeds import SeedStream
from tests.conftest import CLI, composed, load_results, reevaluate, write_fake_cifar10


def _change_one_test_pixel(root: Path) -> None:
    path = root / "cifar-10-batches-py" / "test_batch"
    batch = pickle.loads(path.read_bytes())
    batch[b"data"][7, 100] ^= 1
    path.write_bytes(pickle.dumps(batch))


def _dm(root: Path, **kw: object) -> CIFARDataModule:
    dm = CIFARDataModule(root=root, val_size=20, download=False, **kw)  # type: ignore[arg-type]
    dm.setup()
    return dm


def test_the_fingerprint_sees_one_changed_image(tmp_path: Path) -> None:
    a, b = write_fake_cifar10(tmp_path / "a"), write_fake_cifar10(tmp_path / "b")
    assert _dm(a).fingerprint == _dm(b).fingerprint and len(_dm(a).fingerprint) == 16  # same images
    _change_one_test_pixel(b)
    assert _dm(a).fingerprint != _dm(b).fingerprint
    assert _dm(a).fingerprint != _dm(a, test_subset=30).fingerprint  # a subset is other data
    assert _dm(a).fingerprint != _dm(a, selection_source="test_half").fingerprint


def test_test_half_selects_on_one_half_and_reports_on_the_other(tmp_path: Path) -> None:
    root = write_fake_cifar10(tmp_path, n_train=100, n_test=41)
    dm = _dm(root, selection_source="test_half", seed=3)
    x_test, y_test = dm.test_tensors()
    assert len(dm.val_y) == 20 and len(y_test) == dm.test_size == 21
    assert len(dm.train_y) == 100  # nothing held out of training
    _, _, all_x, _ = load_cifar("cifar10", root, False)
    rows = {bytes(im.numpy().tobytes()) for im in all_x}
    sel = {bytes(im.numpy().tobytes()) for im in dm.val_x}
    rep = {bytes(im.numpy().tobytes()) for im in x_test}
    assert sel | rep == rows and not sel & rep  # disjoint halves of the test set, nothing lost
    assert torch.equal(all_x[dm.test_index], x_test)  # outcomes.npz's test_index: the reported images
    other = _dm(root, selection_source="test_half", seed=4)
    assert not torch.equal(other.val_x, dm.val_x)  # seeded
    with pytest.raises(DataError, match="data.test_subset=1: data.selection_source=test_half"):
        _dm(root, selection_source="test_half", test_subset=1)


def test_alpha_one_is_evaluated_like_every_other_alpha(tmp_path: Path) -> None:
    """theta(1) gets the interpolation's seeded evaluation, not the last fine-tuning validation."""
    root = write_fake_cifar10(tmp_path / "data")
    cfg = composed("scale=smoke", f"data.root={root}", "data.val_size=40", "interpolation.alphas=[0,0.5,1]")
    dm = _dm(root)
    evaluator = Evaluator.from_config(cfg, dm.num_classes, torch.device("cpu"))

    def on_selection(model: torch.nn.Module) -> dict[str, float]:
        return evaluator(model, dm.val_x, dm.val_y, SeedStream.SELECTION_EVAL)

    torch.manual_seed(0)
    base, tuned = build_model("resnet18", 10, 2).eval(), build_model("resnet18", 10, 2).eval()
    base_val = on_selection(base)
    curve = interpolation_curve(base, tuned, cfg.interpolation.alphas, base_val, on_selection)
    assert [p["alpha"] for p in curve] == [0.0, 0.5, 1.0]
    one = on_selection(tuned)
    assert curve[-1] == {"alpha": 1.0, **one}
    half = build_model("resnet18", 10, 2).eval()
    half.load_state_dict(interpolate_state(base.state_dict(), tuned.state_dict(), 0.5))
    assert curve[1] == {"alpha": 0.5, **on_selection(half)}
    assert curve[0] == {"alpha": 0.0, **base_val}


@pytest.mark.slow
def test_another_copy_of_the_data_is_never_handed_the_old_results(tmp_path: Path) -> None:
    """Two data roots that differ in one image, one shared cache: the second run reuses nothing."""
    a, b = write_fake_cifar10(tmp_path / "a"), write_fake_cifar10(tmp_path / "b")
    _change_one_test_pixel(b)
    cli = CLI(tmp_path, a)
    first = load_results(cli("+experiment=at", "data.val_size=40"))[0]
    assert "adversarial_training" in first["timings"]
    again = cli("+experiment=at", "data.val_size=40")
    assert "complete already" in again.stdout  # the same data: the finished result is reused
    cli.env["RIFT_BN_DATA"] = str(b)
    proc = cli("+experiment=at", "data.val_size=40")
    other = load_results(proc)[0]
    assert "complete already" not in proc.stdout
    assert "adversarial_training" in other["timings"]  # its own base model, trained on its own data
    assert other["data_fingerprint"] != first["data_fingerprint"]
    assert other["base"]["checkpoint"] != first["base"]["checkpoint"]


@pytest.mark.slow
def test_bf16_training_reports_float32_accuracies_and_the_rift_row_is_rift(cli) -> None:
    (r,) = load_results(cli("trainer.precision=bf16-mixed", "method=rift", "k=1"))
    assert (
        r["config"]["trainer"]["precision"] == "bf16-mixed" and r["config"]["eval"]["precision"] == "32-true"
    )
    for which in ("base", "final"):
        again = reevaluate(r, which)
        assert {k: r[which][k] for k in again} == again, which
    # method=rift is the original RiFT: the whole net's BN statistics adapt
    assert r["bn_stats"] == "all" and r["config"]["finetune"]["bn_stats"] == "all"
    assert r["data_fingerprint"] and r["selection_held_out"] is True
    assert r["selection_source"] == "train_holdout" and (r["selection_size"], r["test_size"]) == (100, 100)
    tuned = Path(r["finetuned_checkpoint"])
    assert tuned.is_file() and tuned.parent == Path(r["final"]["checkpoint"]).parent
    # a published checkpoint (here: this base) was trained on the whole training set: said and recorded
    base = r["base"]["checkpoint"]
    proc = cli(f"base.checkpoint={base}", "k=1")
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("warning: base.checkpoint=")]
    assert len(warnings) == 1 and "data.selection_source=test_half" in warnings[0]
    (pub,) = load_results(proc)
    assert pub["selection_held_out"] is False and pub["bn_stats"] == "selected"
