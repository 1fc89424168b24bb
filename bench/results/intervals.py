"""Statistics for reported accuracies: exact binomial (Clopper-Pearson) intervals, McNemar's exact
test, and the Student-t interval of a mean of per-example values (the single-draw accuracy of a
randomized model). Pure functions (scipy.stats); the results layer and the certifiers
(:mod:`bench.certifiers.stats`) share them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats

__all__ = ["CONFIDENCE", "accuracy_interval", "clopper_pearson", "counts", "mcnemar_exact", "mean_interval",
           "single_draw_interval", "t_half_width"]

CONFIDENCE = 0.95  # the level of every interval on a board or plot


def clopper_pearson(k: int, n: int, alpha: float = 1.0 - CONFIDENCE) -> tuple[float, float]:
    """Two-sided exact (Clopper-Pearson) interval at level ``1 - alpha`` for ``k`` successes in ``n``.

    Guarantee: for ``k ~ Binomial(n, p)`` with ``n`` fixed in advance, ``P(lo <= p <= hi) >= 1 - alpha``,
    with at most ``alpha/2`` of miscoverage on each side. ``lo = Beta.ppf(alpha/2; k, n-k+1)`` (0.0
    at ``k == 0``), ``hi = Beta.ppf(1 - alpha/2; k+1, n-k)`` (1.0 at ``k == n``). The caller
    validates ``0 <= k <= n``, ``n >= 1`` and ``0 < alpha < 1``.
    """
    lo = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2.0, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1.0 - alpha / 2.0, k + 1, n - k))
    return lo, hi


def counts(accuracy: float | None, n: int | None) -> int | None:
    """The number of correct examples behind ``accuracy`` measured on ``n`` examples, or None when
    ``accuracy * n`` is not a whole number (an accuracy averaged over several random draws, a
    balanced accuracy) or either is missing: such a value has no binomial count."""
    if accuracy is None or not n or not math.isfinite(accuracy) or not 0.0 <= accuracy <= 1.0:
        return None
    k = accuracy * n
    return round(k) if abs(k - round(k)) < 1e-6 else None


def accuracy_interval(accuracy: float | None, n: int | None) -> tuple[float, float] | None:
    """The 95% Clopper-Pearson interval of an accuracy over ``n`` examples, or None when the
    accuracy is not a count over ``n`` (:func:`counts`)."""
    k = counts(accuracy, n)
    return None if k is None or n is None else clopper_pearson(k, n)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """McNemar's exact test: the two-sided p-value of ``H0: an example correct under one run and
    not the other is equally likely to favour either run``, from the discordant pairs ``only_a``
    (correct in A only) and ``only_b`` (correct in B only). Exact binomial test of
    ``only_a ~ Binomial(only_a + only_b, 1/2)``; 1.0 when there are no discordant pairs."""
    total = only_a + only_b
    if total == 0:
        return 1.0
    return float(stats.binomtest(only_a, total, 0.5, alternative="two-sided").pvalue)


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Student-t interval of the mean of per-example values in [0, 1]:
    ``mean +- t_{(1+confidence)/2, n-1} * s / sqrt(n)``, clipped to [0, 1]; ``s`` is the sample
    standard deviation (ddof 1). None when there are no values; (0, 1) for a single value (no
    variance estimate). When every value is equal (e.g. every example always right, or always
    wrong) the sample variance is 0 and the t interval would have zero width: the exact
    Clopper-Pearson interval of ``round(n * mean)`` in ``n`` is returned instead, which is what a
    deterministic model with the same outcomes gets (the widest interval a mean of [0, 1] values
    that are all 0 or all 1 can need).

    Why it covers both sources of noise: for a randomized model, ``v_i = correct_draws_i / R`` of
    example ``i`` is an unbiased estimate of the probability ``p_i`` that one forward pass on it is
    correct. With the examples drawn from the data distribution and the draws independent, the
    law of total variance gives ``Var(v_i) = Var(p_i) + E[p_i (1 - p_i) / R]``: the between-example
    variance plus the within-example binomial variance of R draws. The sample variance of the
    ``v_i`` estimates exactly this sum, so ``s / sqrt(n)`` is the standard error of the mean over
    both the choice of examples and the draws (asymptotically; the t quantile is the usual
    small-sample allowance, not an exact guarantee). With exact enumeration of the draw space
    ``v_i = p_i`` and only the between-example variance remains.
    """
    n = len(values)
    if n == 0:
        return None
    if n == 1:
        return 0.0, 1.0
    mean = sum(values) / n
    half = t_half_width(values, confidence)
    if half <= 0.0:  # every value equal: no variance estimate
        return clopper_pearson(round(mean * n), n)
    return max(0.0, mean - half), min(1.0, mean + half)


def t_half_width(values: Sequence[float], confidence: float = CONFIDENCE) -> float:
    """Half-width of the two-sided Student-t interval of the mean of ``values``:
    ``t_{(1+confidence)/2, n-1} * s / sqrt(n)`` with ``s`` the sample standard deviation (ddof 1);
    infinite with fewer than 2 values."""
    n = len(values)
    if n < 2:
        return math.inf
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return float(stats.t.ppf((1.0 + confidence) / 2.0, n - 1)) * math.sqrt(var / n)


def single_draw_interval(values: Sequence[float], one_draw: bool) -> tuple[float, float] | None:
    """The 95% interval of a single-draw accuracy, the mean of per-example ``values``: when
    ``one_draw`` (every row behind the values has one draw, so each value is 0 or 1) the exact
    Clopper-Pearson interval of their count, else :func:`mean_interval`. None when there are no
    values."""
    n = len(values)
    if n == 0:
        return None
    if one_draw:
        return clopper_pearson(round(sum(values)), n)
    return mean_interval(values)
