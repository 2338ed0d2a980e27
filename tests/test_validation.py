"""Bad settings are refused in one line naming the full key: types, keys and choices by the schema
(rift_bn.schema, while composing), the rest by ``validate``; every job of a sweep first; every shipped
config passes."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rift_bn.config import ConfigError, validate
from rift_bn.errors import UserError
from rift_bn.precheck import CONF_DIR, precheck
from rift_bn.schema import Dataset, Kind, LoggerName, Method, Model
from tests.conftest import CLI, composed, refused


def check(argv: list[str], needles: list[str]) -> None:
    msg = refused(*argv)
    for needle in needles:
        assert needle in msg, msg


@functools.cache
def _default_cfg() -> DictConfig:
    cfg = composed()
    OmegaConf.resolve(cfg)
    return cfg


def with_value(key: str, value: object) -> DictConfig:
    """The default config with ``key`` set to ``value`` (the schema converts or refuses it)."""
    cfg = copy.deepcopy(_default_cfg())
    OmegaConf.update(cfg, key, value, merge=False)
    return cfg


# 1. the schema's own errors: the full key, the value, what is allowed (exact lines)
MRC_KEYS = "batch_size, epochs, epsilon, estimator, exact_lowest, linear_step, lr, num_examples, shuffle, "
MRC_KEYS += "steps_per_epoch"


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        # a wrong type
        (["mrc.epochs=abc"], "mrc.epochs=abc: wrong type; allowed: a whole number"),
        (["k=1.5"], "k=1.5: wrong type; allowed: a whole number"),
        (["data.train_subset=abc"], "data.train_subset=abc: wrong type; allowed: a whole number, or null"),
        (["finetune.momentum=abc"], "finetune.momentum=abc: wrong type; allowed: a number"),
        (["force=maybe"], "force=maybe: wrong type; allowed: true or false"),
        (["trainer.progress_bar=null"], "trainer.progress_bar=null: wrong type; allowed: true or false"),
        (["interpolation.alphas=0.5"], "interpolation.alphas=0.5: wrong type; allowed: a list of numbers"),
        (["at.milestones=null"], "at.milestones=null: wrong type; allowed: a list of whole numbers"),
        (["finetune.milestones=[1.5]"], "finetune.milestones[0]=1.5: wrong type; allowed: a whole number"),
        (["logger.tags=3"], "logger.tags=3: wrong type; allowed: a list of strings"),
        (
            ["at.attack=3"],
            "at.attack=3: wrong type; allowed: a section with keys eps, alpha, steps, random_start",
        ),
        # an unknown key (the nearest one when close)
        (["mrc.foo=1"], f"mrc.foo=1: no such setting (check the spelling); allowed keys of mrc: {MRC_KEYS}"),
        (
            ["+mrc.foo=1"],
            f"+mrc.foo=1: no such setting (check the spelling); allowed keys of mrc: {MRC_KEYS}",
        ),
        (
            ["mrc.epoch=3"],
            f"mrc.epoch=3: no such setting (did you mean mrc.epochs?); allowed keys of mrc: {MRC_KEYS}",
        ),
        (
            ["logger=csv", "logger.project=x"],
            "logger.project=x: no such setting (check the spelling); allowed keys of logger: name",
        ),
        (
            ["data.num_classes=100"],  # the data set decides it (rift_bn.data.DATASETS)
            "data.num_classes=100: no such setting (check the spelling); allowed keys of data: "
            "download, name, root, selection_source, test_subset, train_subset, val_size",
        ),
        # an unknown choice
        (["data.name=svhn"], "data.name=svhn: unknown choice; allowed: cifar10, cifar100, tiny_imagenet"),
        (["method.bn_stats=some"], "method.bn_stats=some: unknown choice; allowed: selected, all, none"),
        (["finetune.bn_stats=some"], "finetune.bn_stats=some: unknown choice; allowed: selected, all, none"),
        (["method.kinds=[conv,foo]"], "method.kinds[1]=foo: unknown choice; allowed: conv, linear, bn"),
        (["stage=[at]"], "stage=[at]: unknown choice; allowed: at, finetune"),
        (
            ["trainer.precision=64-true"],
            "trainer.precision=64-true: unknown choice; allowed: 32-true, 16-mixed, bf16-mixed",
        ),
        (["eval.precision=32"], "eval.precision=32: unknown choice; allowed: 32-true, 16-mixed, bf16-mixed"),
        (
            ["trainer.accelerator=tpu"],
            "trainer.accelerator=tpu: unknown choice; allowed: auto, cpu, gpu, cuda, mps",
        ),
        (["at.attack_bn_mode=batch"], "at.attack_bn_mode=batch: unknown choice; allowed: train, eval"),
        (
            ["data.selection_source=test"],
            "data.selection_source=test: unknown choice; allowed: train_holdout, test_half",
        ),
        (["method.selection=best"], "method.selection=best: unknown choice; allowed: mrc, all"),
        (
            ["data=svhn"],
            "data=svhn: unknown choice; allowed: cifar10, cifar100, tiny_imagenet",
        ),  # a group option
        # what the schema cannot say: a pixel string, a deleted setting
        (
            ["attack.eps=abc"],
            "attack.eps=abc: not a number; write e.g. attack.eps=8/255 or attack.eps=0.0314",
        ),
        (
            ["at.attack.alpha=1/0"],
            "at.attack.alpha=1/0: not a number; write e.g. at.attack.alpha=8/255 or at.attack.alpha=0.0314",
        ),
        (
            ["~mrc.estimator"],
            "~mrc.estimator: a setting of the schema cannot be deleted; set mrc.estimator=... instead",
        ),
        (["~k"], "k: required setting is missing; set k=... or drop the override that removed it"),
    ],
)
def test_exact_one_line_errors(argv: list[str], line: str) -> None:
    assert refused(*argv) == line


def test_a_bad_setting_exits_2_with_one_line_and_no_output(tmp_path: Path) -> None:
    """precheck's exit path through the real entry point (every message above is checked in process): the
    line on stderr, exit status 2, nothing written (no output folder, no cache)."""
    proc = CLI(tmp_path, None)("mrc.epochs=abc", check=False, tiny=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: mrc.epochs=abc: wrong type; allowed: a whole number"]
    assert proc.stdout == "" and not any(tmp_path.iterdir())


# 2. a multirun is checked job by job, not only at the first value of each sweep
@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["-m", "k=1,0"], ["k=0: must be a whole number >= 1"]),
        (["-m", "data=cifar10,foo"], ["data=foo: unknown choice; allowed: cifar10, cifar100"]),
        (["-m", "seed=0,abc"], ["seed=abc: wrong type; allowed: a whole number"]),
        (["-m", "method=rift,bogus"], ["method=bogus: unknown choice; allowed: bn_only", "rift_bn"]),
        (["-m", "stage=at,foo"], ["stage=foo: unknown choice; allowed: at, finetune"]),
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
        (
            ["-m", "finetune.lrr=0.1,0.2"],
            ["finetune.lrr=0.1,0.2: no such setting (did you mean finetune.lr?)"],
        ),
        # over MAX_JOBS combinations: each value of each sweep is still checked
        (["-m", "k=range(1,60)", "seed=range(0,3)", "at.epochs=1,0"], ["at.epochs=0:"]),
        (["-m", "k=range(1,60)", "seed=range(0,3)", "model.width=8,1.5"], ["model.width=1.5: wrong type"]),
    ],
)
def test_every_job_of_a_sweep_is_checked(argv: list[str], needles: list[str]) -> None:
    check(argv, needles)


def test_sweep_jobs_are_composed_as_hydra_composes_them() -> None:
    """Swept plain values applied to a cached composition give the config a full compose gives."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from rift_bn.precheck import _check_jobs

    # +extra: Hydra adds it around the schema (validate refuses it; here only the composition counts)
    argv = ["scale=cpu,smoke", "k=1,2", "+extra=1,2", "model.compile=true", "data.val_size=300"]
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
    assert refused("+extra=1").startswith("+extra=1: no such setting (check the spelling); allowed top-level")


# 3. ranges: whole numbers >= 1 (or 0), seed a 32-bit unsigned integer, non-negative rates
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
    "attack.restarts",
    "trainer.num_nodes",
    "trainer.log_every_n_steps",
]
NULLABLE_INTEGERS = [
    "data.train_subset",
    "data.test_subset",
    "mrc.num_examples",
    "mrc.exact_lowest",
    "mrc.steps_per_epoch",
]


def test_integer_settings_refuse_other_types_and_values_below_one() -> None:
    for key in INTEGERS + NULLABLE_INTEGERS:
        allowed = "a whole number" + (", or null" if key in NULLABLE_INTEGERS else "")
        assert refused(f"{key}=1.5") == f"{key}=1.5: wrong type; allowed: {allowed}"
        with pytest.raises(ConfigError, match=rf"^{key}=0: must be a whole number >= 1"):
            validate(with_value(key, 0))
    for key in ("attack.steps", "at.attack.steps"):
        assert refused(f"{key}=true") == f"{key}=true: wrong type; allowed: a whole number"
        assert validate(with_value(key, 0)) is None  # no attack steps: the clean start point
        with pytest.raises(ConfigError, match=rf"^{key}=-1: must be a whole number >= 0$"):
            validate(with_value(key, -1))
    for key in NULLABLE_INTEGERS:
        assert validate(with_value(key, None)) is None


@pytest.mark.parametrize(
    ("value", "line"),
    [
        ("abc", "seed=abc: wrong type; allowed: a whole number"),
        ("1.5", "seed=1.5: wrong type; allowed: a whole number"),
        ("false", "seed=false: wrong type; allowed: a whole number"),
        ("[0]", "seed=[0]: wrong type; allowed: a whole number"),
        ("-1", "seed=-1: must be a whole number in [0, 4294967295]"),
        ("4294967296", "seed=4294967296: must be a whole number in [0, 4294967295]"),
    ],
)
def test_seed_is_a_32_bit_unsigned_integer(value: str, line: str) -> None:
    assert refused(f"seed={value}") == line


def test_mrc_examples_fit_the_selection_split() -> None:
    assert refused("scale=smoke", "mrc.num_examples=1000") == (
        "mrc.num_examples=1000: larger than the selection split (data.val_size=200); lower it, raise "
        "data.val_size, or set mrc.num_examples=null for the whole split"
    )
    assert precheck(["scale=smoke", "mrc.num_examples=200"]) is None


def test_booleans_take_omegaconf_spellings_and_nothing_else() -> None:
    cfg = with_value("force", "no")  # OmegaConf's BooleanNode: true/false, yes/no, on/off, 1/0
    assert cfg.force is False and with_value("mrc.shuffle", 1).mrc.shuffle is True
    assert refused("data.download=maybe") == "data.download=maybe: wrong type; allowed: true or false"
    assert refused("mrc.linear_step=[true]") == "mrc.linear_step=[true]: wrong type; allowed: true or false"


# 4. trainer, optimiser and logger settings that Lightning, SGD or wandb would refuse late
@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["trainer.precision=32"], ["trainer.precision=32: unknown choice; allowed: 32-true"]),
        (["at.momentum=-0.1"], ["at.momentum=-0.1:", "[0, 1)"]),
        (["finetune.momentum=1"], ["finetune.momentum=1.0:", "[0, 1)"]),
        (["at.weight_decay=-1"], ["at.weight_decay=-1.0: must be a number >= 0"]),
        (["finetune.gamma=nan"], ["finetune.gamma=nan: must be a number >= 0"]),
        (["mrc.lr=inf"], ["mrc.lr=inf: must be a number >= 0"]),
        (["at.milestones=5"], ["at.milestones=5: wrong type; allowed: a list of whole numbers"]),
        (["at.milestones=[-1]"], ["at.milestones=[-1]: epochs are >= 0"]),
        (["trainer.accelerator=1"], ["trainer.accelerator=1: unknown choice"]),
        (["trainer.devices=0"], ["trainer.devices=0:", "auto"]),
        (["trainer.devices=1.5"], ["trainer.devices=1.5:"]),
        (["trainer.devices=[]"], ["trainer.devices=[]:"]),
        (["trainer.devices=[0,0]"], ["trainer.devices=[0,0]:"]),
        (["trainer.devices=some"], ["trainer.devices=some:"]),
        (["trainer=cpu", "trainer.devices=[0]"], ["trainer.devices=[0]:", "trainer.accelerator=cpu"]),
        (
            ["trainer.deterministic=sometimes"],
            ["trainer.deterministic=sometimes: choose true, false or warn"],
        ),
        (["logger=wandb", "logger.mode=foo"], ["logger.mode=foo: unknown; choose one of offline, online"]),
    ],
)
def test_trainer_optimiser_and_logger_settings(argv: list[str], needles: list[str]) -> None:
    check(argv, needles)


def test_wandb_mode_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    check(["logger=wandb"], ["WANDB_MODE (environment variable)=sometimes: unknown", "offline"])
    assert precheck(["logger=csv"]) is None  # only the wandb logger reads it


# 5. values of the right type but the wrong shape, bad interpolations: one line, never a traceback
@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (
            ["interpolation.alphas=[]"],
            ["interpolation.alphas=[]: need a non-empty list of numbers in [0, 1]"],
        ),
        (["interpolation.alphas=[0,1.5]"], ["interpolation.alphas=[0.0,1.5]:"]),
        (
            ["interpolation.alphas=[0.5,1]"],
            ["interpolation.alphas=[0.5,1.0]:", "must include 0", "[0,0.5,1.0]"],
        ),
        (["interpolation.tolerance=-1"], ["interpolation.tolerance=-1.0: must be a number >= 0"]),
        (["method.kinds=[]"], ["method.kinds=[]: need at least one module kind; allowed: conv, linear, bn"]),
        (["attack.eps=2"], ["attack.eps=2: must lie in [0, 1]"]),
        (["at.attack.alpha=[1]"], ["at.attack.alpha=[1]: not a number"]),
        (["attack.eps=true"], ["attack.eps=true: not a number"]),
        (["base.checkpoint=/surely/not/here.pt"], ["base.checkpoint=/surely/not/here.pt: file not found"]),
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
    ["trainer.precision=16-mixed", "trainer.deterministic=warn"],
    ["seed=4294967295", "force=true", "mrc.shuffle=true", "eval.autoattack=true"],
    ["finetune.milestones=null", "finetune.momentum=0", "mrc.estimator=linear", "mrc.linear_step=true"],
    ["data.train_subset=null", "mrc.num_examples=1000", "attack.steps=0", "attack.eps=0.03"],
    ["interpolation.alphas=[1]", "logger=wandb", "logger.mode=disabled"],
    ["mrc.steps_per_epoch=null", "mrc.shuffle=false", "at.attack_bn_mode=eval", "eval.precision=bf16-mixed"],
    ["+experiment=topk", "mrc.exact_lowest=null", "-m", "k=1,2"],
    ["mrc.exact_lowest=3", "k=5"],
    ["data.selection_source=test_half", "mrc.num_examples=5000", "-m", "finetune.bn_stats=selected,all,none"],
    ["method.bn_stats=none", "method.kinds=[bn]", "logger=tensorboard"],
]


@pytest.mark.parametrize("argv", VALID, ids=" ".join)
def test_shipped_configs_pass(argv: list[str]) -> None:
    assert precheck(argv) is None


def test_registries_key_on_the_schema_enums() -> None:
    """Each registry has an entry for every Enum member, and every group option is one of them."""
    from rift_bn.data import DATASETS
    from rift_bn.models import ARCHITECTURES, CANDIDATE_KINDS

    for registry, enum in ((DATASETS, Dataset), (ARCHITECTURES, Model), (CANDIDATE_KINDS, Kind)):
        assert list(registry) == list(enum) and all(isinstance(key, enum) for key in registry)
    for group, enum in (("data", Dataset), ("model", Model), ("method", Method), ("logger", LoggerName)):
        assert set(_options(group)) <= set(enum), group
    assert DATASETS["cifar100"].num_classes == 100  # plain strings find the members


# validate itself: whatever a setting is set to, the schema refuses it or validate answers in one line
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
            cfg = with_value(key, value)
        except OmegaConfBaseException:
            continue  # the schema's refusal (precheck words it, test_exact_one_line_errors)
        try:
            validate(cfg)
        except ConfigError as e:
            assert "\n" not in str(e) and key.split(".")[0] in str(e), (key, e)


def test_user_errors_share_one_type() -> None:
    from rift_bn.data import DataError
    from rift_bn.models.checkpoint import CheckpointError

    assert all(issubclass(t, UserError) for t in (ConfigError, DataError, CheckpointError))


def test_ddp_batch_must_split_evenly_among_processes() -> None:
    """Under DDP the recipe's batch is the whole step's; each process takes batch / world of it."""
    base = ["trainer=ddp", "trainer.accelerator=cpu"]
    assert precheck([*base, "trainer.devices=2"]) is None
    msg = refused(*base, "trainer.devices=3")
    assert msg.startswith("at.batch_size=128: a step's batch is split")
    assert refused(*base, "trainer.devices=2", "finetune.batch_size=65").startswith("finetune.batch_size=65:")
    msg = refused("trainer.devices=3", "trainer.accelerator=cpu")  # Lightning picks DDP for 3 devices
    assert msg.startswith("at.batch_size=128:")
    assert precheck(["trainer.devices=1", "trainer.accelerator=cpu"]) is None
