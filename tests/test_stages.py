"""Pipeline stages on their own (no subprocess): what each training stage learns from; the MRC set."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rift_bn.data import CIFARDataModule, to_float
from rift_bn.models import build_model
from rift_bn.pipeline import Run
from tests.test_config import composed
from tests.test_data import _write_fake_cifar10


def test_adversarial_set_is_pgd_of_the_selection_split_in_eval_mode_and_cached(tmp_path: Path) -> None:
    """DESIGN step 5: PGD-10 examples of the first ``mrc.num_examples`` selection-split images, made on the
    base model in eval mode (its BN statistics untouched), once per base and split."""
    _write_fake_cifar10(tmp_path / "data")
    cfg = composed("scale=smoke", f"data.root={tmp_path / 'data'}", "data.val_size=40", "mrc.num_examples=24")
    d = cfg.data
    dm = CIFARDataModule(d.name, d.root, d.val_size, d.train_subset, d.test_subset, seed=0, download=False)
    dm.setup()
    run = Run(cfg, tmp_path / "out", torch.device("cpu"), dm, tmp_path / "cache")
    torch.manual_seed(0)
    model = build_model("resnet18", 10, 4).train()  # as the pipeline hands it over: a fresh model
    before = {k: v.clone() for k, v in model.state_dict().items()}

    x_adv, y = run.adversarial_set(model, "ab" * 32)
    x = to_float(dm.val_x[:24])
    assert torch.equal(y, dm.val_y[:24]) and x_adv.shape == x.shape
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and not torch.equal(x_adv, x)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # eval mode throughout
    assert model.training  # and handed back as it came
    model.eval()
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)

    (path,) = (tmp_path / "cache" / "adv").glob("*.pt")
    assert path == run.adversarial_set_path("ab" * 32, 24)
    stamp = path.stat().st_mtime_ns
    again, y2 = run.adversarial_set(model, "ab" * 32)  # a second job of the sweep: read, not recomputed
    assert torch.equal(again, x_adv) and torch.equal(y2, y) and path.stat().st_mtime_ns == stamp


def _recorded_step(module: torch.nn.Module) -> list[torch.Tensor]:
    """Replace the module's loss step by a recorder of the images it is given."""
    seen: list[torch.Tensor] = []
    module.cross_entropy_step = lambda x, y, *rest: seen.append(x.detach().clone())  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_adversarial_training_learns_from_pgd_examples_made_in_the_chosen_bn_mode(bn_mode: str) -> None:
    """DESIGN step 3: the AT loss is on PGD examples of the batch. ``at.attack_bn_mode=train`` (default)
    crafts them as Bag-of-Tricks and Madry's code do, with the network in train mode: batch statistics,
    and every forward of the attack updates the BN running statistics, exactly as torchattacks' PGD in
    training mode. ``eval``: eval mode, statistics untouched. The model is in train mode for the update."""
    import torchattacks

    from rift_bn.attacks import PGD
    from rift_bn.modules import AdversarialTraining

    torch.manual_seed(0)
    model = build_model("resnet18", 10, 4).train()
    reference = copy.deepcopy(model)
    attack = PGD(8 / 255, 2 / 255, 3, train_mode=bn_mode == "train")
    module = AdversarialTraining(model, attack, PGD(8 / 255, 2 / 255, 1), 10)
    modes: list[bool] = []
    hook = model.net.bn1.register_forward_hook(lambda m, i, o: modes.append(m.training))
    seen = _recorded_step(module)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    stats = model.net.bn1.running_mean.clone()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        module.training_step((x, y), 0)
    hook.remove()
    theirs = torchattacks.PGD(reference, eps=8 / 255, alpha=2 / 255, steps=3, random_start=True)
    if bn_mode == "train":
        theirs.set_model_training_mode(model_training=True, batchnorm_training=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        expected = theirs(x, y)
    (adv,) = seen
    assert torch.equal(adv, expected) and 0 < (adv - x).abs().max() <= 8 / 255 + 1e-6
    assert len(modes) == 3 and all(m == (bn_mode == "train") for m in modes)  # one forward per step
    after = {k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in after.items())  # as the reference
    assert torch.equal(model.net.bn1.running_mean, stats) == (bn_mode == "eval")
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_fine_tuning_learns_from_the_clean_batch() -> None:
    """DESIGN step 6: fine-tuning is on clean training data (the validation attack is not used)."""
    from rift_bn.modules import FineTuning

    class Refuse:
        def __call__(self, *args: object) -> None:
            raise AssertionError("fine-tuning must not attack its training batch")

    module = FineTuning(build_model("resnet18", 10, 4), Refuse(), 10)  # type: ignore[arg-type]
    seen = _recorded_step(module)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    module.training_step((x, y), 0)
    (clean,) = seen
    assert torch.equal(clean, x)


def test_fine_tuning_lr_decays_half_way_by_default() -> None:
    """DESIGN step 6: lr x0.1 at half-way (finetune.milestones: null); the optimiser really steps down."""
    from rift_bn.modules import FineTuning
    from rift_bn.pipeline import finetune_milestones

    assert finetune_milestones(10, None) == (5,) and finetune_milestones(1, None) == (1,)
    assert finetune_milestones(10, [3, 7]) == (3, 7)
    module = FineTuning(
        build_model("resnet18", 10, 4), None, 10, lr=1e-3, milestones=finetune_milestones(10, None)
    )  # type: ignore[arg-type]
    ([opt], [sched]) = module.configure_optimizers()
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-3] * 5 + [1e-4] * 5)
