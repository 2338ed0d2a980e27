"""The composed configuration: DESIGN's protocol numbers at paper scale, and what keys each cache."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from rift_bn.config import pixels, validate
from rift_bn.mrc import MRCProtocol
from rift_bn.pipeline.keys import CacheKeys, job_key
from rift_bn.pipeline.mrc_table import exact_lowest
from tests.conftest import composed


def test_paper_scale_defaults_are_the_protocol() -> None:
    cfg = composed()
    validate(cfg)
    assert cfg.data.name == "cifar10" and cfg.data.val_size == 1000 and cfg.data.train_subset is None
    assert cfg.model.name == "resnet18" and cfg.model.width == 64
    assert cfg.method.name == "rift_bn" and list(cfg.method.kinds) == ["conv", "linear", "bn"]
    # evaluation / MRC / validation attack: PGD-10, eps 8/255, step 2/255, random start
    a = cfg.attack
    assert (pixels(a.eps, "eps"), pixels(a.alpha, "alpha")) == (8 / 255, 2 / 255)
    assert a.steps == 10 and a.random_start and a.restarts == 1
    # adversarial training: PGD-10 AT, SGD 0.9 / 5e-4, batch 128, lr 0.1 for 110 epochs, x0.1 at 100, 105
    at = cfg.at
    assert (at.epochs, at.lr, at.momentum, at.weight_decay, at.batch_size) == (110, 0.1, 0.9, 5e-4, 128)
    assert list(at.milestones) == [100, 105] and at.gamma == 0.1
    assert (pixels(at.attack.eps, "eps"), pixels(at.attack.alpha, "alpha")) == (8 / 255, 2 / 255)
    assert at.attack.steps == 10 and at.attack.random_start
    # MRC: plain SGD ascent, lr 1, batches of 512, 10 epochs, ||dW|| <= 0.1 ||W||, the exact protocol
    m = cfg.mrc
    # RiFT's length: 20 shuffled steps per epoch (10,000 examples / batch 512), 200 in all
    assert m.estimator == "exact" and m.num_examples is None and m.shuffle and m.steps_per_epoch == 20
    assert (m.epsilon, m.epochs, m.lr, m.batch_size) == (0.1, 10, 1.0, 512)
    proto = MRCProtocol()
    assert (proto.epsilon, proto.epochs, proto.lr, proto.batch_size, proto.shuffle, proto.steps(1000)) == (
        m.epsilon,
        m.epochs,
        m.lr,
        m.batch_size,
        m.shuffle,
        m.steps_per_epoch,
    )
    assert MRCProtocol(steps_per_epoch=None).steps(1000) == 2  # null: one pass over the set
    assert cfg.at.attack_bn_mode == "train" and cfg.eval.precision == "32-true"
    assert cfg.data.selection_source == "train_holdout"
    # fine-tuning: SGD 0.9 / 5e-4, lr 1e-3, 10 epochs, x0.1 half-way, selected BN layers adapt their stats
    f = cfg.finetune
    assert (f.epochs, f.lr, f.momentum, f.weight_decay, f.gamma) == (10, 1e-3, 0.9, 5e-4, 0.1)
    assert f.milestones is None and f.bn_stats == "selected"  # null = [epochs // 2]; rift_bn's default
    assert composed("method=rift").finetune.bn_stats == "all"  # the original RiFT: every BN adapts
    assert composed("method=rift", "finetune.bn_stats=none").finetune.bn_stats == "none"
    # interpolation: a in {0, 0.1, ..., 1}, no robust accuracy given up
    assert [round(10 * a) for a in cfg.interpolation.alphas] == list(range(11))
    assert cfg.interpolation.tolerance == 0.0


@pytest.mark.parametrize(
    "method, kinds", [("rift", ["conv", "linear"]), ("rift_bn", ["conv", "linear", "bn"])]
)
def test_methods_name_their_candidates(method: str, kinds: list[str]) -> None:
    cfg = composed(f"method={method}")
    assert cfg.method.selection == "mrc" and list(cfg.method.kinds) == kinds


def test_exact_lowest_defaults() -> None:
    """Every module exact by default; the topk sweep needs its largest k exactly; a larger k raises n."""
    assert composed().mrc.exact_lowest is None and composed("scale=cpu").mrc.exact_lowest is None
    assert composed("+experiment=topk").mrc.exact_lowest == 5
    assert exact_lowest(_run().cfg.mrc, 1) is None
    assert exact_lowest(_run("mrc.exact_lowest=5").cfg.mrc, 2) == 5
    assert exact_lowest(_run("mrc.exact_lowest=2").cfg.mrc, 4) == 4


@functools.cache
def _run(*overrides: str, fingerprint: str = "f" * 16) -> CacheKeys:
    """A job's cache keys (no data is read; ``fingerprint`` stands for the data)."""
    return CacheKeys(composed("scale=cpu", *overrides), fingerprint, Path("cache"))


H = "0123456789abcdef" * 4  # a base checkpoint's content hash

# what must give a new cache entry, and what must reuse it (the sweep's shared base / MRC / adversarial set)
BASE_KEY = (
    ["seed=1", "data=cifar100", "data.val_size=400", "data.train_subset=100", "model=preact_resnet18"]
    + ["model.width=8", "at.epochs=3", "at.lr=0.05", "at.milestones=[1]", "at.attack.steps=2"]
    + ["attack.eps=4/255", "attack.steps=5", "trainer.precision=bf16-mixed", "at.attack_bn_mode=eval"]
    + ["trainer=ddp", "trainer.devices=2", "eval.precision=bf16-mixed", "data.selection_source=test_half"]
)
NOT_BASE_KEY = ["k=3", "method=rift", "finetune.lr=0.01", "mrc.epochs=3", "interpolation.tolerance=1"]
NOT_BASE_KEY += ["logger=csv", "model.compile=true", "model.channels_last=true", "eval.batch_size=100"]
MRC_KEY = ["mrc.epsilon=0.2", "mrc.epochs=3", "mrc.lr=0.5", "mrc.batch_size=100", "mrc.shuffle=false"]
MRC_KEY += ["mrc.steps_per_epoch=5", "mrc.steps_per_epoch=null", "data.selection_source=test_half"]
MRC_KEY += ["mrc.num_examples=100", "mrc.estimator=linear", "seed=1", "data.val_size=400", "attack.steps=5"]
NOT_MRC_KEY = ["k=3", "method=rift", "finetune.lr=0.01", "at.epochs=3", "eval.batch_size=100", "logger=csv"]
NOT_MRC_KEY += ["interpolation.tolerance=1", "mrc.linear_step=true"]  # linear_step: the linear table only
NOT_MRC_KEY += ["trainer.precision=bf16-mixed", "eval.precision=bf16-mixed"]  # the MRC set is float32
NOT_MRC_KEY += ["mrc.exact_lowest=3"]  # one table per base: a bounded table is continued, not another
ADV_KEY = ["attack.eps=4/255", "attack.alpha=1/255", "attack.steps=5", "seed=1", "data.val_size=400"]
NOT_ADV_KEY = ["mrc.epochs=3", "mrc.estimator=linear", "k=3", "method=rift", "eval.batch_size=100"]


@pytest.mark.parametrize("override", BASE_KEY + NOT_BASE_KEY)
def test_base_model_cache_key(override: str) -> None:
    changed = _run(override).base_path() != _run().base_path()
    assert changed == (override in BASE_KEY)


@pytest.mark.parametrize("override", MRC_KEY + NOT_MRC_KEY)
def test_mrc_table_cache_key(override: str) -> None:
    assert (_run(override).mrc_path(H) != _run().mrc_path(H)) == (override in MRC_KEY)
    assert _run(override).mrc_path(H[::-1]) != _run(override).mrc_path(H)  # another base, another table


def test_linear_step_keys_only_the_linear_table() -> None:
    lin = _run("mrc.estimator=linear").mrc_path(H)
    assert _run("mrc.estimator=linear", "mrc.linear_step=true").mrc_path(H) != lin
    assert lin.name.split("-")[1] == "linear" and _run().mrc_path(H).name.split("-")[1] == "exact"


@pytest.mark.parametrize("override", ADV_KEY + NOT_ADV_KEY)
def test_adversarial_set_cache_key(override: str) -> None:
    changed = _run(override).adversarial_set_path(H, 500) != _run().adversarial_set_path(H, 500)
    assert changed == (override in ADV_KEY)
    assert _run(override).adversarial_set_path(H, 100) != _run(override).adversarial_set_path(H, 500)


EVAL_KEY = ["eval.precision=bf16-mixed", "attack.steps=5", "attack.eps=4/255", "seed=1", "data=cifar100"]
EVAL_KEY += ["data.selection_source=test_half"]
NOT_EVAL_KEY = ["k=3", "method=rift", "mrc.epochs=3", "finetune.lr=0.01", "eval.batch_size=100", "logger=csv"]
NOT_EVAL_KEY += ["trainer.precision=bf16-mixed"]  # evaluation is float32 whatever the training precision


@pytest.mark.parametrize("override", EVAL_KEY + NOT_EVAL_KEY)
def test_base_evaluation_cache_key(override: str) -> None:
    """The base model's cached evaluations: a bf16 job does not reuse the float32 numbers."""
    for split in ("val", "test"):
        changed = _run(override).eval_path(H, split) != _run().eval_path(H, split)
        assert changed == (override in EVAL_KEY), split
    assert _run("data.val_size=400").eval_path(H, "val") != _run().eval_path(H, "val")
    assert _run("data.val_size=400").eval_path(H, "test") == _run().eval_path(H, "test")
    assert _run("data.test_subset=50").eval_path(H, "test") != _run().eval_path(H, "test")
    assert _run("eval.autoattack=true").eval_path(H, "test") != _run().eval_path(H, "test")


def test_the_loaded_data_keys_every_cache() -> None:
    """Another copy of the data (one image changed, a subset) at the same path gets its own entries."""
    one, other = _run(), _run(fingerprint="e" * 16)
    assert one.base_path() != other.base_path()
    assert one.adversarial_set_path(H, 500) != other.adversarial_set_path(H, 500)
    assert one.mrc_path(H) != other.mrc_path(H)
    for split in ("val", "test"):
        assert one.eval_path(H, split) != other.eval_path(H, split)
    cfg = composed("scale=cpu")
    assert job_key(cfg, "f" * 16) != job_key(cfg, "e" * 16)
    assert job_key(cfg, "f" * 16) == job_key(composed("scale=cpu", "data.root=/elsewhere"), "f" * 16)


@pytest.mark.parametrize("scale", ["cpu", "smoke"])
@pytest.mark.parametrize("model, width", [("resnet18", 16), ("preact_resnet18", 16), ("wrn34_10", 1)])
def test_small_scales_make_each_architecture_narrow(scale: str, model: str, width: int) -> None:
    """WideResNet's width is its widen factor: the CPU profiles must not turn WRN-34-10 into WRN-34-16."""
    cfg = composed(f"scale={scale}", f"model={model}")
    validate(cfg)
    assert cfg.model.width == width
    assert composed(f"scale={scale}", f"model={model}", "model.width=2").model.width == 2


def test_the_schema_types_the_composed_config() -> None:
    """The schema's types come back (Enum members equal to their strings, floats), with the same plain
    values in a cache key, a YAML dump and a pickle (the joblib launcher) as the strings they replace."""
    import pickle

    from omegaconf import OmegaConf

    from rift_bn.cache import digest
    from rift_bn.schema import Config, Dataset, LoggerConfig, Precision, WandbLoggerConfig

    cfg = composed("scale=smoke", "interpolation.tolerance=1", "trainer.precision=bf16-mixed")
    assert OmegaConf.get_type(cfg) is Config and OmegaConf.get_type(cfg.logger) is WandbLoggerConfig
    assert OmegaConf.get_type(composed("logger=csv").logger) is LoggerConfig  # no W&B keys there
    assert cfg.data.name is Dataset.cifar10 and cfg.data.name == "cifar10" and "num_classes" not in cfg.data
    assert cfg.trainer.precision is Precision["bf16-mixed"] and cfg.trainer.precision == "bf16-mixed"
    assert isinstance(cfg.interpolation.tolerance, float) and cfg.model.width == 16
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert digest(plain) == digest(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    text = OmegaConf.to_yaml(cfg)
    assert "  name: cifar10\n" in text and "precision: bf16-mixed\n" in text
    assert pickle.loads(pickle.dumps(cfg)) == cfg
