"""LightningModules: adversarial training of the base model, selective fine-tuning."""

from rift_bn.modules.adversarial import AdversarialTraining
from rift_bn.modules.common import RobustClassifier, quiet_trainer
from rift_bn.modules.finetune import FineTuning

__all__ = ["AdversarialTraining", "FineTuning", "RobustClassifier", "quiet_trainer"]
