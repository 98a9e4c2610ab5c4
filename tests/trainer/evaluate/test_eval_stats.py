"""Percentiles and the paired bootstrap, against hand computations."""

from __future__ import annotations

import itertools

import pytest
from distillery_trainer.evaluate.stats import bootstrap_ratio, percentile, ratio_of_means


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile([1, 2, 3, 4], 95) == pytest.approx(3.85)  # 1 + 0.95 * 3 = 3.85 -> 3 + 0.85
    assert percentile([5], 99) == 5


def exact_bootstrap(num: list[float], den: list[float]) -> list[float]:
    """Every one of the n**n equally likely resamples, enumerated: the bootstrap distribution itself."""
    n = len(num)
    out = []
    for idx in itertools.product(range(n), repeat=n):
        d = sum(den[i] for i in idx)
        if d > 0:
            out.append(sum(num[i] for i in idx) / d)
    return sorted(out)


def quantile(sorted_values: list[float], q: float) -> float:
    return percentile(sorted_values, q * 100)


def test_bootstrap_interval_converges_to_the_enumerated_distribution() -> None:
    student = [6.5, 8.5, 3.5, 9.0, 5.5, 7.5]
    teacher = [8.0, 9.0, 7.5, 9.5, 8.5, 7.0]
    assert ratio_of_means(student, teacher) == pytest.approx(40.5 / 49.5)
    exact = exact_bootstrap(student, teacher)  # 6**6 = 46,656 resamples
    iv = bootstrap_ratio(student, teacher, resamples=100_000, confidence=0.9)
    assert iv is not None and iv.confidence == 0.9
    assert iv.low == pytest.approx(quantile(exact, 0.05), abs=0.005)
    assert iv.high == pytest.approx(quantile(exact, 0.95), abs=0.005)
    assert iv.low < 40.5 / 49.5 < iv.high
    # seeded: the same scores give the same interval
    assert bootstrap_ratio(student, teacher, resamples=1000) == bootstrap_ratio(
        student, teacher, resamples=1000
    )


def test_bootstrap_edge_cases() -> None:
    assert bootstrap_ratio([], []) is None
    assert bootstrap_ratio([1.0], [0.0]) is None  # no resample has a ratio
    iv = bootstrap_ratio([0.5, 0.5], [1.0, 1.0])
    assert iv is not None and iv.low == iv.high == 0.5
    with pytest.raises(ValueError, match="pair up"):
        bootstrap_ratio([1.0], [1.0, 2.0])
