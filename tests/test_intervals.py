"""Exact binomial statistics of the results layer: Clopper-Pearson intervals and McNemar's test."""

from __future__ import annotations

import math

import pytest

from bench.certifiers.stats import clopper_pearson_interval
from bench.results.intervals import accuracy_interval, clopper_pearson, counts, mcnemar_exact


def test_clopper_pearson_closed_forms_at_the_ends() -> None:
    # k = 0: hi = 1 - (alpha/2)^(1/n); k = n: lo = (alpha/2)^(1/n)
    assert clopper_pearson(0, 10) == (0.0, pytest.approx(1 - 0.025 ** (1 / 10)))
    assert clopper_pearson(10, 10) == (pytest.approx(0.025 ** (1 / 10)), 1.0)
    lo, hi = clopper_pearson(100, 200)
    assert lo == pytest.approx(1 - hi) and round(100 * (hi - 0.5), 1) == 7.1  # symmetric at 1/2


def test_clopper_pearson_covers_at_least_95_percent() -> None:
    from scipy import stats

    n, p = 30, 0.37
    coverage = sum(stats.binom.pmf(k, n, p) for k in range(n + 1)
                   if clopper_pearson(k, n)[0] <= p <= clopper_pearson(k, n)[1])
    assert coverage >= 0.95


def test_certifiers_use_the_same_interval() -> None:
    for k, n, alpha in ((0, 5, 0.05), (3, 7, 0.01), (7, 7, 0.2)):
        assert clopper_pearson_interval(k, n, alpha) == clopper_pearson(k, n, alpha)
    with pytest.raises(ValueError):
        clopper_pearson_interval(8, 7, 0.05)  # the certifiers keep their validation


def test_counts_only_for_whole_numbers_of_examples() -> None:
    assert counts(0.9, 450) == 405 and counts(0.0, 3) == 0 and counts(1 / 3, 3) == 1
    assert counts(0.5005, 100) is None  # an average over random draws
    assert counts(None, 10) is None and counts(0.5, None) is None and counts(0.5, 0) is None
    assert counts(math.nan, 10) is None
    assert accuracy_interval(0.9, 450) == clopper_pearson(405, 450)
    assert accuracy_interval(0.5005, 100) is None


def test_mcnemar_exact() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(10, 0) == pytest.approx(2 * 0.5 ** 10)
    assert mcnemar_exact(0, 10) == mcnemar_exact(10, 0)
    assert mcnemar_exact(7, 2) == pytest.approx(2 * sum(math.comb(9, i) for i in range(3)) / 2 ** 9)
