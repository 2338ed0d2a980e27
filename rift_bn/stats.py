"""Paired statistics of base vs final model on the same test images (torch-free).

Both models are scored image by image on the same images with the same attack random starts, so the
comparison is paired: the delta's 95% confidence interval comes from a bootstrap over images (pairs kept
together, percentile method) and its significance from the exact McNemar test (a two-sided
binomial test on the discordant images: those only one of the two models gets right). Pooling over seeds
concatenates the images of every seed (images x seeds), each pair still within its own seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import binomtest

CONFIDENCE = 0.95
RESAMPLES = 100_000
ALPHA = 0.05  # significance level of the marks in the report's tables
TESTS_NOTE = (
    "95% CI: paired percentile bootstrap over test images (100,000 resamples); "
    "p: exact two-sided McNemar test; * = p < 0.05"
)


def _bools(a: Sequence[bool] | np.ndarray) -> np.ndarray:
    out = np.asarray(a)
    if out.dtype != np.bool_:
        raise TypeError(f"outcomes must be boolean per image, got {out.dtype}")
    return out.ravel()


def percent(correct: np.ndarray) -> float:
    """Accuracy in percent as the exact fraction of the counts (``correct * 100 / total``)."""
    correct = _bools(correct)
    return int(correct.sum()) * 100 / len(correct) if len(correct) else float("nan")


def mcnemar_p(before: np.ndarray, after: np.ndarray) -> float:
    """Exact two-sided McNemar p-value: images right only after vs right only before, Binomial(n, 1/2)."""
    before, after = _bools(before), _bools(after)
    gained = int((after & ~before).sum())
    lost = int((before & ~after).sum())
    if gained + lost == 0:
        return 1.0
    return float(binomtest(gained, gained + lost, 0.5).pvalue)


def paired_ci(
    before: np.ndarray,
    after: np.ndarray,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the accuracy delta (percentage points) over paired images.

    The same interval as ``scipy.stats.bootstrap((diff,), np.mean, method="percentile")`` on the per-image
    differences ``diff`` in {-1, 0, +1} (tests/test_stats.py checks the two agree), drawn faster: a resample
    of n images is fully described by how many of them are -1, 0 and +1, a multinomial draw, so each
    resample costs O(1) instead of O(n) (scipy needs ~4 s for 10,000 resamples of 6,000 images).
    """
    before, after = _bools(before), _bools(after)
    n = len(before)
    if n == 0:
        return float("nan"), float("nan")
    gained = int((after & ~before).sum())
    lost = int((before & ~after).sum())
    probs = np.array([lost, n - gained - lost, gained]) / n
    counts = np.random.default_rng(seed).multinomial(n, probs, size=resamples)
    means = 100.0 * (counts[:, 2] - counts[:, 0]) / n
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_stats(before: np.ndarray, after: np.ndarray, seed: int = 0) -> dict[str, float | int]:
    """Delta (after - before, percentage points), its 95% CI, the McNemar p-value and the counts."""
    before, after = _bools(before), _bools(after)
    if before.shape != after.shape:
        raise ValueError(f"paired outcomes differ in length: {before.shape} vs {after.shape}")
    low, high = paired_ci(before, after, seed=seed)
    return {
        "delta": (int(after.sum()) - int(before.sum())) * 100 / len(before) if len(before) else float("nan"),
        "ci_low": low,
        "ci_high": high,
        "p_value": mcnemar_p(before, after),
        "n": int(len(before)),
        "gained": int((after & ~before).sum()),
        "lost": int((before & ~after).sum()),
    }


def pooled(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Outcome vectors of several seeds (each paired within itself) as one vector of images x seeds."""
    return np.concatenate([_bools(p) for p in parts]) if parts else np.zeros(0, dtype=bool)
