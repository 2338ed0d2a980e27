"""Pipeline stages on their own and one whole job in process (no subprocess): what each training stage
learns from, the MRC set, the Trainer of the trainer group, the record a job returns and writes."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from rift_bn.attacks import PGD
from rift_bn.data import CIFARDataModule, to_float
from rift_bn.models import build_model
from rift_bn.pipeline.keys import CacheKeys
from rift_bn.pipeline.mrc_table import adversarial_set
from rift_bn.seeds import SeedStream, seeded
from tests.conftest import composed, write_fake_cifar10


def test_adversarial_set_is_pgd_of_the_selection_split_in_eval_mode_and_cached(tmp_path: Path) -> None:
    """DESIGN step 5: PGD-10 examples of the first ``mrc.num_examples`` selection-split images, made on the
    base model in eval mode (its BN statistics untouched), once per base and split."""
    write_fake_cifar10(tmp_path / "data")
    cfg = composed("scale=smoke", f"data.root={tmp_path / 'data'}", "data.val_size=40", "mrc.num_examples=24")
    dm = CIFARDataModule.from_config(cfg)
    dm.setup()
    torch.manual_seed(0)
    model = build_model("resnet18", 10, 4).train()  # as the pipeline hands it over: a fresh model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = CacheKeys(cfg, dm.fingerprint, tmp_path / "cache").adversarial_set_path("ab" * 32, 24)
    attack, cpu = PGD.from_config(cfg.attack), torch.device("cpu")

    def made() -> tuple[torch.Tensor, torch.Tensor]:
        return adversarial_set(model, dm.val_x[:24], dm.val_y[:24], attack, 10, cpu, cfg.seed, path)

    x_adv, y = made()
    x = to_float(dm.val_x[:24])
    assert torch.equal(y, dm.val_y[:24]) and x_adv.shape == x.shape
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and not torch.equal(x_adv, x)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # eval mode throughout
    assert model.training  # and handed back as it came
    model.eval()
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)
    # on its own seed stream (seed + 1): the set does not depend on what ran before it
    torch.manual_seed(123)
    with seeded(cfg.seed, SeedStream.ADVERSARIAL_SET):
        expected = torch.cat([attack(model, x[i : i + 10], y[i : i + 10]) for i in range(0, 24, 10)])
    assert SeedStream.ADVERSARIAL_SET.of(cfg.seed) == cfg.seed + 1 and torch.equal(expected, x_adv)

    assert [p.name for p in (tmp_path / "cache" / "adv").glob("*.pt")] == [path.name]
    stamp = path.stat().st_mtime_ns
    cached, y2 = made()  # a second job of the sweep: read, not recomputed
    assert torch.equal(cached, x_adv) and torch.equal(y2, y) and path.stat().st_mtime_ns == stamp


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
    from rift_bn.pipeline.finetune import finetune_milestones

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


def test_seed_streams_keep_their_offsets() -> None:
    """The offsets are part of every published number: training/MRC batches, adversarial set, selection
    split, test report, corrupted test images."""
    assert [(s.name, s.of(10)) for s in SeedStream] == [
        ("JOB", 10),
        ("ADVERSARIAL_SET", 11),
        ("SELECTION_EVAL", 13),
        ("TEST_EVAL", 14),
        ("CORRUPTION_EVAL", 15),
    ]


def test_the_trainer_is_the_trainer_group(tmp_path: Path) -> None:
    """Every key of the trainer group reaches Lightning's Trainer (``progress_bar`` under its Lightning name),
    a key the group gains too; the process count is the DDP world size, 1 when pinned to one GPU."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from omegaconf import open_dict

    from rift_bn.pipeline.training import Training

    cpu = torch.device("cpu")
    cfg = composed("trainer=cpu", "trainer.log_every_n_steps=7", "trainer.progress_bar=true")
    with open_dict(cfg.trainer):
        cfg.trainer.max_steps = 5
    training = Training(cfg.trainer, None, tmp_path, cpu)  # type: ignore[arg-type]
    trainer = training.trainer(3, tmp_path / "work", None, [])
    assert trainer.max_epochs == 3 and trainer.max_steps == 5 and trainer.log_every_n_steps == 7
    assert trainer.progress_bar_callback is not None and trainer.logger is None
    (last,) = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert last.dirpath == str(tmp_path / "work")
    quiet = Training(composed("trainer=cpu").trainer, None, tmp_path, cpu)  # type: ignore[arg-type]
    assert quiet.trainer(1, tmp_path, None, []).progress_bar_callback is None
    with pytest.raises(TypeError, match="unexpected keyword"):  # a key Lightning does not know is no flag
        with open_dict(cfg.trainer):
            cfg.trainer.no_such_flag = 1
        training.trainer(1, tmp_path, None, [])

    def processes(*overrides: str, gpu: int | None = None) -> int:
        return Training(composed(*overrides).trainer, None, tmp_path, cpu, gpu).processes  # type: ignore[arg-type]

    assert processes() == 1 and processes("trainer=ddp") == 2
    assert processes("trainer=ddp", "trainer.devices=3", "trainer.num_nodes=2") == 6
    assert processes("trainer.devices=[0,1]") == 2 and processes("trainer.devices='0,1,2'") == 3
    assert processes("trainer=ddp", gpu=1) == 1


def test_a_job_returns_the_record_it_writes(
    tmp_path: Path, hydra_job: Callable[..., DictConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    """run_job in process on a tiny network: the Results it returns are those of its results.json (beside
    Hydra's output and in the cache), identity included; run again, it reads them back."""
    from rift_bn.pipeline import run_job
    from rift_bn.results import SCHEMA_VERSION, Experiment, load

    root = write_fake_cifar10(tmp_path / "data", n_train=120, n_test=40)
    cfg = hydra_job(
        "+experiment=topk", "scale=smoke", "data=cifar10", "method=rift_bn", "k=2", "logger=none",
        f"data.root={root}", f"cache_dir={tmp_path / 'cache'}", "data.val_size=20", "data.train_subset=100",
        "data.test_subset=40", "model.width=2", "at.epochs=1", "at.milestones=[1]", "at.batch_size=50",
        "at.attack.steps=1", "attack.steps=1", "finetune.epochs=1", "finetune.milestones=[1]",
        "finetune.batch_size=50", "mrc.epochs=1", "mrc.batch_size=10", "eval.batch_size=20",
    )  # fmt: skip
    r = run_job(cfg)
    (state,) = (tmp_path / "cache" / "runs").iterdir()
    assert load(tmp_path / "out" / "results.json") == r == load(state / "results.json")
    group = r.experiment.group
    assert r.experiment == Experiment(
        group, "topk", "finetune", "cifar10", "resnet18", 2, "rift_bn", 2, "selected", 0
    )
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["schema_version"] == SCHEMA_VERSION and written["experiment"]["name"] == "topk"
    assert (written["method"], written["k"], written["dataset"]) == ("rift_bn", 2, "cifar10")  # version 1's
    assert r.job_key == state.name and r.test_split_reads_before_report == 0 and len(r.selected) == 2
    assert all(type(row["type"]) is str for row in [*r.mrc, *r.selected])  # plain data, as loggers need
    assert r.alpha in (0.0, 0.5, 1.0) and [p["alpha"] for p in r.interpolation] == [0.0, 0.5, 1.0]
    assert r.final["checkpoint"] == str(tmp_path / "out" / "final.pt") and r.config["k"] == 2
    assert {"adversarial_training", "mrc", "finetune", "interpolation", "test_eval"} <= r.timings.keys()
    # per-image outcomes: the accuracies are exactly their counts; the stats are those of the file
    from rift_bn.results import outcome_stats, read_outcomes

    out = read_outcomes(tmp_path / "out" / r.outcomes)
    assert sorted(out) == ["base_clean", "base_robust", "final_clean", "final_robust", "test_index"]
    assert out["test_index"].tolist() == list(range(40)) and out["base_clean"].dtype == bool
    for who, acc in (("base", r.base), ("final", r.final)):
        for m in ("clean", "robust"):
            assert acc[f"{m}_acc"] == int(out[f"{who}_{m}"].sum()) * 100 / 40
    assert r.stats == outcome_stats(out) and r.stats["robust"]["n"] == 40
    assert r.stats["clean"]["delta"] == r.delta["clean_acc"]
    (tmp_path / "out" / r.outcomes).unlink()
    capsys.readouterr()
    assert run_job(cfg) == r and "complete already" in capsys.readouterr().out
    again = read_outcomes(tmp_path / "out" / r.outcomes)  # copied back from the finished run's cache
    assert again["final_robust"].tolist() == out["final_robust"].tolist()
