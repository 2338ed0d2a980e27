"""The job's named random streams: each stage draws from its own stream, derived from ``seed`` alone, so its
numbers do not depend on what ran before it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum

import torch


class SeedStream(IntEnum):
    """A stream's offset from the job's ``seed`` (the values are part of every published number)."""

    JOB = 0  # Lightning's seed_everything before each fit (data order, augmentation, AT starts), MRC batches
    ADVERSARIAL_SET = 1  # PGD starts of MRC's adversarial set (rift_bn.mrc.adversarial_examples)
    SELECTION_EVAL = 3  # PGD starts of every selection-split evaluation (base, interpolation points)
    TEST_EVAL = 4  # PGD starts of the test-set report
    CORRUPTION_EVAL = 5  # PGD starts on the corrupted test images (eval.corruptions_attack)

    def of(self, seed: int) -> int:
        """This stream's seed for the job seed ``seed``."""
        return seed + self.value


@contextmanager
def seeded(seed: int, stream: SeedStream) -> Iterator[None]:
    """Run the block on ``stream`` of ``seed`` (torch's CPU generator, forked: the caller's state returns)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream.of(seed))
        yield
