"""Percentiles and the bootstrap interval of quality retention.

Retention is a ratio of means over the same prompts, ``sum(student) / sum(teacher)``, so its interval
comes from a paired bootstrap: resample prompts with replacement (each resample keeps a prompt's student
and teacher score together), recompute the ratio, and take the percentile interval. The generator is
seeded, so the same scores always give the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..api.status import Interval

BOOTSTRAP_SEED = 20240917


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between order statistics (numpy's default,
    and what ``vllm bench serve`` reports)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def ratio_of_means(numerator: Sequence[float], denominator: Sequence[float]) -> float | None:
    total = sum(denominator)
    return sum(numerator) / total if total > 0 else None


def bootstrap_ratio(
    numerator: Sequence[float],
    denominator: Sequence[float],
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = BOOTSTRAP_SEED,
) -> Interval | None:
    """Percentile interval of ``sum(numerator) / sum(denominator)`` under a paired bootstrap.

    Resamples whose denominator is 0 have no ratio and are dropped; None when there is nothing to
    resample or every resample was dropped.
    """
    import numpy as np

    if len(numerator) != len(denominator):
        raise ValueError("numerator and denominator must pair up, one value per prompt")
    n = len(numerator)
    if n == 0:
        return None
    num, den = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    rng = np.random.default_rng(seed)
    ratios = []
    chunk = max(1, 2_000_000 // n)  # bounds memory to ~16 MB of indices at a time
    left = resamples
    while left > 0:
        size = min(chunk, left)
        idx = rng.integers(0, n, size=(size, n))
        top, bottom = num[idx].sum(axis=1), den[idx].sum(axis=1)
        ok = bottom > 0
        ratios.append(top[ok] / bottom[ok])
        left -= size
    values = np.concatenate(ratios)
    if values.size == 0:
        return None
    alpha = (1.0 - confidence) / 2.0
    low, high = np.percentile(values, [100 * alpha, 100 * (1 - alpha)])
    return Interval(low=round(float(low), 6), high=round(float(high), 6), confidence=confidence)
