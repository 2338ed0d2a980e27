"""Bad settings are refused by ``precheck`` in one line naming the setting; every shipped config passes."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from rift_bn.config import BOOLEANS, KINDS, ConfigError, validate
from rift_bn.precheck import CONF_DIR, precheck


def refused(*argv: str) -> str:
    """precheck's reason for ``argv``, asserted to be a single line."""
    msg = precheck(list(argv))
    assert isinstance(msg, str) and msg, f"accepted: {argv}"
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def check(argv: list[str], needles: list[str]) -> None:
    msg = refused(*argv)
    for needle in needles:
        assert needle in msg, msg


@functools.cache
def _default_cfg() -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config")
    OmegaConf.resolve(cfg)
    return cfg


def with_value(key: str, value: object) -> DictConfig:
    """The default config with ``key`` set to ``value`` (as if given on the command line)."""
    cfg = copy.deepcopy(_default_cfg())
    OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    return cfg


def assert_refused(cfg: DictConfig, *needles: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    msg = str(info.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


# 1. a multirun is checked job by job, not only at the first value of each sweep
@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["-m", "k=1,0"], ["k=0:"]),
        (["-m", "data=cifar10,foo"], ["data=foo", "cifar100"]),
        (["-m", "seed=0,abc"], ["seed=abc:"]),
        (["-m", "method=rift,bogus"], ["method=bogus", "rift_bn"]),
        (["-m", "stage=at,foo"], ["stage=foo:", "finetune"]),
        (["--multirun", "k=choice(2,0)"], ["k=0:"]),
        (["-m", "k=range(3,-1,-1)"], ["k=0:"]),
        (["-m", "k=range(0)"], ["k=range(0)", "no values"]),
        (
            ["-m", "data.val_size=100,1000", "mrc.num_examples=500"],
            ["mrc.num_examples=500", "data.val_size=100"],
        ),
        (
            ["-m", "scale=paper,smoke", "mrc.num_examples=100,500"],
            ["mrc.num_examples=500", "data.val_size=200"],
        ),
        (["-m", "finetune.lrr=0.1,0.2"], ["finetune.lrr", "spelling"]),
        # over MAX_JOBS combinations: each value of each sweep is still checked
        (["-m", "k=range(1,60)", "seed=range(0,3)", "at.epochs=1,0"], ["at.epochs=0:"]),
        (["-m", "k=range(1,60)", "seed=range(0,3)", "model.width=8,1.5"], ["model.width=1.5:"]),
    ],
)
def test_every_job_of_a_sweep_is_checked(argv: list[str], needles: list[str]) -> None:
    check(argv, needles)


def test_sweep_jobs_are_composed_as_hydra_composes_them() -> None:
    """Swept plain values applied to a cached composition give the config a full compose gives."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from rift_bn.precheck import _check_jobs

    argv = ["scale=cpu,smoke", "k=1,2", "+extra=1,2", "~model.compile", "data.val_size=300"]
    seen: list[dict] = []
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        parsed = OverridesParser.create().parse_overrides(argv)
        _check_jobs(
            parsed,
            lambda job: compose("config", overrides=job),
            lambda c: seen.append(OmegaConf.to_container(c)),
        )
        expected = []
        for scale in ("cpu", "smoke"):
            for k in (1, 2):
                for extra in (1, 2):
                    job = [f"scale={scale}", f"k={k}", f"+extra={extra}", *argv[3:]]
                    expected.append(OmegaConf.to_container(compose("config", overrides=job), resolve=True))
    assert len(seen) == 8 and sorted(map(repr, seen)) == sorted(map(repr, expected))


# 2. whole numbers are whole numbers; seed is a 32-bit unsigned integer
INTEGERS = [
    "k",
    "model.width",
    "at.epochs",
    "finetune.epochs",
    "mrc.epochs",
    "at.batch_size",
    "finetune.batch_size",
    "mrc.batch_size",
    "eval.batch_size",
    "data.val_size",
    "data.train_subset",
    "data.test_subset",
    "mrc.num_examples",
    "mrc.exact_lowest",
    "attack.steps",
    "attack.restarts",
    "at.attack.steps",
    "trainer.num_nodes",
    "trainer.log_every_n_steps",
]


def test_integer_settings_refuse_other_values() -> None:
    for key in INTEGERS:
        for value in (1.5, 2.0, True, "abc"):
            shown = str(value).lower()
            assert_refused(with_value(key, value), f"{key}={shown}:", "whole number")
    check(["k=1.5"], ["k=1.5:", "whole number"])  # as Hydra parses the command line
    check(["attack.restarts=true"], ["attack.restarts=true:", "whole number"])


@pytest.mark.parametrize("value", ["abc", "1.5", "-1", "4294967296", "false", "[0]"])
def test_seed_is_a_32_bit_unsigned_integer(value: str) -> None:
    check([f"seed={value}"], [f"seed={value}:", "4294967295"])


# 3. MRC cannot use more examples than the selection split has
def test_mrc_examples_fit_the_selection_split() -> None:
    check(
        ["scale=smoke", "mrc.num_examples=1000"],
        ["mrc.num_examples=1000: larger than the selection split (data.val_size=200)", "null"],
    )
    assert precheck(["scale=smoke", "mrc.num_examples=200"]) is None


# 4. booleans are true or false
def test_boolean_settings_refuse_other_values() -> None:
    for key in (*BOOLEANS, "mrc.linear_step"):
        for value in ("no", "maybe", 1, None):
            assert_refused(
                with_value(key, value), f"{key}={'null' if value is None else value}:", "true or false"
            )
    check(["force=no"], ["force=no:", "true or false"])
    check(["trainer.progress_bar=1"], ["trainer.progress_bar=1:", "true or false"])


# 5. trainer, optimiser and logger settings that Lightning, SGD or wandb would refuse late
@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["trainer.precision=64-true"], ["trainer.precision=64-true", "32-true, 16-mixed, bf16-mixed"]),
        (["trainer.precision=bf16-true"], ["trainer.precision=bf16-true", "bf16-mixed"]),
        (["trainer.precision=32"], ["trainer.precision=32:", "32-true"]),
        (["trainer.precision=half"], ["trainer.precision=half"]),
        (["at.momentum=-0.1"], ["at.momentum=-0.1:", "[0, 1)"]),
        (["finetune.momentum=1"], ["finetune.momentum=1:", "[0, 1)"]),
        (["finetune.momentum=abc"], ["finetune.momentum=abc:"]),
        (["at.weight_decay=-1"], ["at.weight_decay=-1:"]),
        (["finetune.gamma=-0.1"], ["finetune.gamma=-0.1:"]),
        (["at.milestones=5"], ["at.milestones=5:", "[2,4]"]),
        (["at.milestones=null"], ["at.milestones=null:"]),
        (["finetune.milestones=[1.5]"], ["finetune.milestones=[1.5]:", "null"]),
        (["trainer.accelerator=tpu"], ["trainer.accelerator=tpu", "cpu", "gpu", "auto"]),
        (["trainer.accelerator=1"], ["trainer.accelerator=1:"]),
        (["trainer.devices=0"], ["trainer.devices=0:", "auto"]),
        (["trainer.devices=1.5"], ["trainer.devices=1.5:"]),
        (["trainer.devices=[]"], ["trainer.devices=[]:"]),
        (["trainer.devices=[0,0]"], ["trainer.devices=[0,0]:"]),
        (["trainer.devices=some"], ["trainer.devices=some:"]),
        (["trainer=cpu", "trainer.devices=[0]"], ["trainer.devices=[0]:", "trainer.accelerator=cpu"]),
        (["logger=wandb", "logger.mode=foo"], ["logger.mode=foo", "online", "offline", "disabled"]),
        (["method.selection=best"], ["method.selection=best", "mrc, all"]),
    ],
)
def test_trainer_optimiser_and_logger_settings(argv: list[str], needles: list[str]) -> None:
    check(argv, needles)


def test_wandb_mode_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    check(["logger=wandb"], ["WANDB_MODE", "sometimes", "offline"])
    assert precheck(["logger=csv"]) is None  # only the wandb logger reads it


# 6. values of the wrong shape, deleted keys, bad interpolations: one line, never a traceback
@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["interpolation.alphas=0.5"], ["interpolation.alphas=0.5:", "[0, 1]"]),
        (["interpolation.alphas=[abc]"], ["interpolation.alphas=[abc]:"]),
        (["interpolation.alphas=[]"], ["interpolation.alphas=[]:"]),
        (["interpolation.alphas=[0,1.5]"], ["interpolation.alphas=[0,1.5]:"]),
        (["interpolation.alphas=[0.5,1]"], ["interpolation.alphas=[0.5,1]:", "must include 0", "[0,0.5,1]"]),
        (["mrc.steps_per_epoch=0"], ["mrc.steps_per_epoch=0:", "null"]),
        (["mrc.steps_per_epoch=2.5"], ["mrc.steps_per_epoch=2.5:"]),
        (["mrc.exact_lowest=0"], ["mrc.exact_lowest=0:", "null"]),
        (["at.attack_bn_mode=batch"], ["at.attack_bn_mode=batch:", "train, eval"]),
        (["eval.precision=bf32"], ["eval.precision=bf32:", "32-true"]),
        (["data.selection_source=test"], ["data.selection_source=test:", "train_holdout, test_half"]),
        (["method.bn_stats=some"], ["finetune.bn_stats=some:", "selected, all, none"]),
        (["~k"], ["k: required setting is missing"]),
        (["~mrc.estimator"], ["mrc.estimator: required setting is missing"]),
        (["method.kinds=[foo]"], ["method.kinds=[foo]:", "conv, linear, bn"]),
        (["method.kinds=bn"], ["method.kinds=bn:"]),
        (["method.kinds=[]"], ["method.kinds=[]:"]),
        (["stage=[at]"], ["stage=[at]:"]),
        (["attack.eps=abc"], ["attack.eps=abc:", "8/255"]),
        (["at.attack.alpha=[1]"], ["at.attack.alpha=[1]:"]),
        (["attack.eps=true"], ["attack.eps=true:"]),
        (["cache_dir=${nope}"], ["cache_dir=${nope}:", "nope"]),
        (["cache_dir=${oc.env:RIFT_BN_SURELY_UNSET_VAR}"], ["cache_dir=", "RIFT_BN_SURELY_UNSET_VAR"]),
        (["k=${unknown_resolver:}"], ["k=${unknown_resolver:}:"]),
        (["~nope"], ["~nope", "no such setting"]),
        (["+k=3"], ["+k", "without the +"]),
        (["k=[1"], ["k=[1", "cannot parse"]),
    ],
)
def test_malformed_values_give_one_line(argv: list[str], needles: list[str]) -> None:
    check(argv, needles)


# every shipped config (and each group option) passes
def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


SWEEP_EXPERIMENTS = ("topk", "layer_types")  # they sweep method and data: run with -m (test_console.py)
GROUP_OPTIONS = [
    [f"{'+' if group == 'experiment' else ''}{group}={name}", *(["-m"] if name in SWEEP_EXPERIMENTS else [])]
    for group in ("scale", "experiment", "trainer", "logger", "method", "model", "data", "attack")
    for name in _options(group)
]
VALID = [
    [],
    *GROUP_OPTIONS,
    [
        "-m",
        *(f"{'+' if g == 'experiment' else ''}{g}={','.join(_options(g))}" for g in ("scale", "experiment")),
    ]
    + [f"{g}={','.join(_options(g))}" for g in ("trainer", "logger", "method", "model", "data")],
    ["+experiment=topk", "k=1,2,3,4,5", "-m"],
    ["+experiment=topk", "scale=smoke", "data=cifar10", "k=1,2", "-m"],
    ["-m", "data=glob(*)", "k=range(1,6)", "seed=0,1"],
    ["hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "-m", "k=1,2"],
    ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"],
    ["trainer.devices=[0,1]"],
    ["trainer.devices=-1"],
    ["trainer.devices=auto"],
    ["trainer.precision=16-mixed"],
    ["seed=4294967295", "force=true", "mrc.shuffle=true", "eval.autoattack=true"],
    ["finetune.milestones=null", "finetune.momentum=0", "mrc.estimator=linear", "mrc.linear_step=true"],
    ["data.train_subset=null", "mrc.num_examples=1000", "attack.steps=0", "attack.eps=0.03"],
    ["interpolation.alphas=[1]", "logger=wandb", "logger.mode=disabled"],
    ["mrc.steps_per_epoch=null", "mrc.shuffle=false", "at.attack_bn_mode=eval", "eval.precision=bf16-mixed"],
    ["+experiment=topk", "mrc.exact_lowest=null", "-m", "k=1,2"],
    ["mrc.exact_lowest=3", "k=5"],
    ["data.selection_source=test_half", "mrc.num_examples=5000", "-m", "finetune.bn_stats=selected,all,none"],
]


@pytest.mark.parametrize("argv", VALID, ids=" ".join)
def test_shipped_configs_pass(argv: list[str]) -> None:
    assert precheck(argv) is None


def test_kinds_match_the_models() -> None:
    from rift_bn.models import CANDIDATE_KINDS

    assert set(KINDS) == set(CANDIDATE_KINDS)


# validate itself: whatever a setting is replaced with, the answer is None or a one-line ConfigError
def _keys(node: dict, prefix: str = "") -> list[str]:
    """Every dotted key of a plain config, sections included."""
    out = []
    for name, value in node.items():
        out.append(f"{prefix}{name}")
        if isinstance(value, dict):
            out += _keys(value, f"{prefix}{name}.")
    return out


@pytest.mark.parametrize("value", ["abc", 1.5, -1, True, None, [1], {"a": 1}, float("nan")], ids=repr)
def test_validate_never_crashes(value: object) -> None:
    for key in _keys(OmegaConf.to_container(_default_cfg())):
        try:
            validate(with_value(key, value))
        except ConfigError as e:
            assert "\n" not in str(e) and key.split(".")[0] in str(e), (key, e)


def test_ddp_batch_must_split_evenly_among_processes() -> None:
    """Under DDP the recipe's batch is the whole step's; each process takes batch / world of it."""
    from rift_bn.precheck import precheck

    base = ["trainer=ddp", "trainer.accelerator=cpu"]
    assert precheck([*base, "trainer.devices=2"]) is None
    msg = precheck([*base, "trainer.devices=3"])
    assert (
        msg is not None and msg.startswith("at.batch_size=128: a step's batch is split") and "\n" not in msg
    )
    msg = precheck([*base, "trainer.devices=2", "finetune.batch_size=65"])
    assert msg is not None and msg.startswith("finetune.batch_size=65:")
    msg = precheck(["trainer.devices=3", "trainer.accelerator=cpu"])  # Lightning picks DDP for 3 devices
    assert msg is not None and msg.startswith("at.batch_size=128:")
    assert precheck(["trainer.devices=1", "trainer.accelerator=cpu"]) is None


def test_num_classes_must_match_the_dataset() -> None:
    from rift_bn.precheck import precheck

    assert precheck(["data=cifar100"]) is None
    msg = precheck(["data.num_classes=100"])
    assert msg is not None and msg.startswith("data.num_classes=100: cifar10 has 10 classes")
