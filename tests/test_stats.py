"""Paired statistics (rift_bn.stats) on hand-made outcome vectors with known answers."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import bootstrap

from rift_bn.stats import mcnemar_p, paired_ci, paired_stats, percent, pooled


def outcomes(both: int, lost: int, gained: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    """Base/final correctness of ``both + lost + gained + neither`` images with those counts."""
    before = np.array([True] * both + [True] * lost + [False] * gained + [False] * neither)
    after = np.array([True] * both + [False] * lost + [True] * gained + [False] * neither)
    return before, after


def test_percent_is_the_exact_fraction_of_the_counts() -> None:
    assert percent(np.array([True] * 31 + [False] * 69)) == 31.0  # not 31.00000023841858
    assert percent(np.array([True, False, False])) == 100 / 3


def test_mcnemar_p_equals_the_exact_binomial_sum() -> None:
    before, after = outcomes(both=40, lost=3, gained=12, neither=45)
    n, k = 15, 3  # discordant pairs, the smaller side
    direct = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
    assert mcnemar_p(before, after) == pytest.approx(direct, rel=1e-12)
    assert direct == pytest.approx(0.03515625)  # 2 * (1 + 15 + 105 + 455) / 32768
    assert mcnemar_p(after, before) == pytest.approx(direct, rel=1e-12)  # two-sided: symmetric


def test_no_discordant_image_gives_p_one_and_a_zero_interval() -> None:
    before, after = outcomes(both=7, lost=0, gained=0, neither=3)
    s = paired_stats(before, after)
    assert (s["delta"], s["ci_low"], s["ci_high"], s["p_value"]) == (0.0, 0.0, 0.0, 1.0)


def test_bootstrap_interval_equals_exact_enumeration_of_resamples() -> None:
    """n = 6 images: all 6^6 equally likely resamples enumerated; the percentile interval of their
    means is the exact bootstrap interval that enough resamples converge to."""
    before, after = outcomes(both=2, lost=1, gained=2, neither=1)
    diff = 100.0 * (after.astype(int) - before.astype(int))
    means = np.array([diff[list(idx)].mean() for idx in itertools.product(range(6), repeat=6)])
    exact = np.percentile(means, [2.5, 97.5])
    low, high = paired_ci(before, after, resamples=400_000)
    # the means live on a grid of 100/6 points; the interpolated percentile moves by less than a step
    assert abs(low - exact[0]) < 100 / 6 / 4 and abs(high - exact[1]) < 100 / 6 / 4


def test_bootstrap_interval_agrees_with_scipy() -> None:
    rng = np.random.default_rng(3)
    before = rng.random(800) < 0.4
    after = before.copy()
    flip = rng.choice(800, 60, replace=False)
    after[flip[:40]] = True
    after[flip[40:]] = False
    diff = 100.0 * (after.astype(int) - before.astype(int))
    ref = bootstrap((diff,), np.mean, n_resamples=50_000, method="percentile", rng=np.random.default_rng(0))
    low, high = paired_ci(before, after)
    # two Monte Carlo estimates of the same interval: within a fraction of the bootstrap SE (~0.4 pp)
    assert low == pytest.approx(ref.confidence_interval.low, abs=0.06)
    assert high == pytest.approx(ref.confidence_interval.high, abs=0.06)
    assert low < paired_stats(before, after)["delta"] < high


def test_paired_stats_counts_delta_and_determinism() -> None:
    before, after = outcomes(both=50, lost=5, gained=15, neither=30)
    s = paired_stats(before, after)
    assert (s["n"], s["gained"], s["lost"]) == (100, 15, 5)
    assert s["delta"] == 10.0  # (65 - 55) / 100 images, in points
    assert s == paired_stats(before, after)  # seeded: the same interval every time


def test_pooling_over_seeds_concatenates_images() -> None:
    b1, a1 = outcomes(both=3, lost=1, gained=0, neither=1)
    b2, a2 = outcomes(both=2, lost=0, gained=3, neither=0)
    s = paired_stats(pooled([b1, b2]), pooled([a1, a2]))
    assert (s["n"], s["gained"], s["lost"]) == (10, 3, 1)
    assert s["delta"] == 20.0  # (8 - 6) correct of 10 images x seeds
    assert s["p_value"] == pytest.approx(2 * (1 + 4) / 16)  # binomial(4, 1/2), 1 vs 3


def test_non_boolean_outcomes_are_refused() -> None:
    with pytest.raises(TypeError, match="boolean"):
        paired_stats(np.array([1, 0]), np.array([1, 1]))
