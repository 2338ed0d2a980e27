"""The pipeline of one job, stage by stage: each stage a function taking only what it uses.

``job`` (:func:`run_job`: the sequence, the record), ``base`` (train or load the base model), ``mrc_table``
(adversarial set and MRC table), ``finetune``, ``evaluation`` (selection split, interpolation, test report),
``keys`` (cache keys by exclusion), ``training`` (the Trainer of the ``trainer`` group, resume, DDP).
"""

from rift_bn.pipeline.job import RESULTS, run_job

__all__ = ["RESULTS", "run_job"]
