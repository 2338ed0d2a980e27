"""The typed schema of the configuration (torch-free): one Enum per choice, one dataclass per section.

``conf/config.yaml`` starts its defaults list from :data:`SCHEMA`, so OmegaConf refuses a value of the
wrong type, a key the schema lacks and a choice outside its Enum, naming the full key. The values
themselves stay in ``conf/`` (the schema's fields are ``MISSING`` there). What a type cannot say (ranges,
``8/255`` strings, rules across fields, the environment) is checked by :func:`rift_bn.config.validate`.

Each Enum's names are its values (``OmegaConf.to_yaml`` writes names; a ``StrEnum`` member equals and
hashes as its value), so registries keyed on the members answer plain strings too.
"""

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


class Dataset(StrEnum):
    cifar10 = "cifar10"
    cifar100 = "cifar100"
    tiny_imagenet = "tiny_imagenet"


class Model(StrEnum):
    resnet18 = "resnet18"
    preact_resnet18 = "preact_resnet18"
    wrn34_10 = "wrn34_10"


class Method(StrEnum):
    rift = "rift"
    rift_bn = "rift_bn"
    full = "full"
    bn_only = "bn_only"
    conv_linear_only = "conv_linear_only"


class Stage(StrEnum):
    at = "at"  # the base model only
    finetune = "finetune"  # the whole RiFT pipeline


class Kind(StrEnum):
    """Module kinds a method may select (``rift_bn.models.CANDIDATE_KINDS`` maps them to layer types)."""

    conv = "conv"
    linear = "linear"
    bn = "bn"


class Selection(StrEnum):
    mrc = "mrc"  # the k lowest-MRC candidates
    all = "all"  # every module of the method's kinds


class BNStats(StrEnum):
    """Which BN layers update their running statistics while fine-tuning."""

    selected = "selected"
    all = "all"
    none = "none"


class Estimator(StrEnum):
    exact = "exact"
    linear = "linear"


class SelectionSource(StrEnum):
    train_holdout = "train_holdout"
    test_half = "test_half"


class AttackBNMode(StrEnum):
    train = "train"
    eval = "eval"


class AttackName(StrEnum):
    pgd = "pgd"


class Accelerator(StrEnum):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"
    cuda = "cuda"
    mps = "mps"


class LoggerName(StrEnum):
    wandb = "wandb"
    csv = "csv"
    tensorboard = "tensorboard"
    none = "none"


# Lightning precisions the code handles (evaluate.autocast; models stay float32 outside the Trainer).
# Not identifiers, hence the functional form; names and values are the same strings.
Precision = StrEnum("Precision", [(p, p) for p in ("32-true", "16-mixed", "bf16-mixed")], module=__name__)


@dataclass
class DataConfig:
    name: Dataset = MISSING
    root: str = MISSING
    download: bool = MISSING
    val_size: int = MISSING
    train_subset: int | None = MISSING
    test_subset: int | None = MISSING
    selection_source: SelectionSource = MISSING


@dataclass
class ModelConfig:
    name: Model = MISSING
    width: int = MISSING
    channels_last: bool = MISSING
    compile: bool = MISSING


@dataclass
class TrainAttackConfig:
    """PGD of adversarial training; ``eps``/``alpha`` are numbers or fractions like ``8/255``."""

    eps: Any = MISSING
    alpha: Any = MISSING
    steps: int = MISSING
    random_start: bool = MISSING


@dataclass
class AttackConfig(TrainAttackConfig):
    """The attack of evaluation, MRC and validation."""

    name: AttackName = MISSING
    restarts: int = MISSING


@dataclass
class MethodConfig:
    name: Method = MISSING
    selection: Selection = MISSING
    kinds: list[Kind] = MISSING
    bn_stats: BNStats = MISSING


@dataclass
class TrainerConfig:
    accelerator: Accelerator = MISSING
    devices: Any = MISSING  # a count (-1 = all), auto, a list of device ids or a string of them
    strategy: str = MISSING
    num_nodes: int = MISSING
    precision: Precision = MISSING  # type: ignore[valid-type]
    deterministic: Any = MISSING  # true, false or warn
    progress_bar: bool = MISSING
    log_every_n_steps: int = MISSING


@dataclass
class LoggerConfig:
    name: LoggerName = MISSING


@dataclass
class WandbLoggerConfig(LoggerConfig):
    project: str = MISSING
    entity: str | None = MISSING
    mode: str = MISSING  # checked with the WANDB_MODE environment variable, which wins over it
    group: str | None = MISSING
    tags: list[str] = MISSING


@dataclass
class BaseConfig:
    checkpoint: str | None = MISSING
    train_if_missing: bool = MISSING


@dataclass
class SGDConfig:
    epochs: int = MISSING
    lr: float = MISSING
    momentum: float = MISSING
    weight_decay: float = MISSING
    gamma: float = MISSING
    batch_size: int = MISSING


@dataclass
class ATConfig(SGDConfig):
    milestones: list[int] = MISSING
    attack: TrainAttackConfig = field(default_factory=TrainAttackConfig)
    attack_bn_mode: AttackBNMode = MISSING


@dataclass
class FinetuneConfig(SGDConfig):
    milestones: list[int] | None = MISSING
    bn_stats: BNStats = MISSING


@dataclass
class EvalConfig:
    batch_size: int = MISSING
    autoattack: bool = MISSING
    precision: Precision = MISSING  # type: ignore[valid-type]
    # true, false or a list of corruption names: a structured config has no Union of bool and list, so the
    # type is Any and rift_bn.config.corruption_names checks the value
    corruptions: Any = MISSING
    corruptions_subset: int | None = MISSING
    corruptions_attack: bool = MISSING


@dataclass
class MRCConfig:
    estimator: Estimator = MISSING
    linear_step: bool = MISSING
    epsilon: float = MISSING
    epochs: int = MISSING
    lr: float = MISSING
    batch_size: int = MISSING
    num_examples: int | None = MISSING
    shuffle: bool = MISSING
    steps_per_epoch: int | None = MISSING
    exact_lowest: int | None = MISSING


@dataclass
class InterpolationConfig:
    alphas: list[float] = MISSING
    tolerance: float = MISSING


@dataclass
class Config:
    """The whole job: top-level settings, the sections of config.yaml and one node per config group."""

    stage: Stage = MISSING
    seed: int = MISSING
    k: int = MISSING
    force: bool = MISSING
    cache_dir: str = MISSING
    base: BaseConfig = field(default_factory=BaseConfig)
    at: ATConfig = field(default_factory=ATConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mrc: MRCConfig = field(default_factory=MRCConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    interpolation: InterpolationConfig = field(default_factory=InterpolationConfig)
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    attack: AttackConfig = MISSING
    method: MethodConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING


# ConfigStore names: conf/config.yaml's defaults start from SCHEMA; conf/logger/wandb.yaml from WANDB_LOGGER.
SCHEMA = "rift_bn_schema"
WANDB_LOGGER = "rift_bn_wandb_logger_schema"

# model.width of the CPU-scale profiles (scale=cpu, smoke): a narrow network of each architecture.
# ResNets count first-stage channels (64 standard), WideResNet its widen factor (10 standard).
SMALL_WIDTH = {Model.resnet18: 16, Model.preact_resnet18: 16, Model.wrn34_10: 1}


def register() -> None:
    """Store the schema in Hydra's ConfigStore and the ``small_width`` resolver (safe to call again)."""
    store = ConfigStore.instance()
    store.store(name=SCHEMA, node=Config)
    store.store(name=WANDB_LOGGER, node=WandbLoggerConfig)
    OmegaConf.register_new_resolver("small_width", lambda name: SMALL_WIDTH.get(name, 16), replace=True)


register()
