"""Statistics for certification: exact binomial bounds, concentration radii, bounds valid at
looks fixed in advance, and an anytime-valid confidence sequence for a Bernoulli mean.

Pure numpy/scipy (no torch). Every function states the probabilistic guarantee it gives; the
guarantees are only as good as the sampling assumptions named there (independent draws).

Fixed-n bounds
--------------
:func:`clopper_pearson_lower` / :func:`clopper_pearson_interval` are the exact (conservative)
binomial bounds that randomized-smoothing CERTIFY uses; :func:`binomial_pvalue` is the
two-sided exact test that PREDICT uses; :func:`hoeffding_radius` and
:func:`empirical_bernstein_radius` bound the mean of bounded i.i.d. variables. All of them are
valid only when ``n`` is fixed *before* looking at the data: recomputing them while sampling
and stopping once they look good ("peeking") breaks their coverage.

Looks fixed in advance
----------------------
:class:`ClopperPearsonLooks` gives Clopper-Pearson bounds at a schedule of cumulative sample
counts ``t_1 < ... < t_L`` chosen before the data (:func:`geometric_looks`), each at level
``alpha / L``. By the union bound all L bounds hold at once with probability >= 1 - alpha, so
sampling may stop at any look, for any reason seen in the data. This is what sequential
certification uses: its rounds end at such looks, and with L about 15 the price (``log L`` nats
added to ``log(1/alpha)``) is smaller than a confidence sequence's (about ``(1/2) log n``).

Confidence sequence
-------------------
:class:`BetaBinomialConfidenceSequence` is valid at every ``n`` simultaneously, so one may
stop sampling at any data-dependent time. For i.i.d. Bernoulli(p) observations with ``k``
successes in ``n`` trials, and a Beta(a, b) mixing distribution, define

    M_n(p) = ∫ q^k (1-q)^(n-k) dBeta(a, b)(q) / (p^k (1-p)^(n-k))
           = B(a + k, b + n - k) / (B(a, b) p^k (1-p)^(n-k)).

Each ``q^k (1-q)^(n-k) / (p^k (1-p)^(n-k))`` is the likelihood ratio of Bernoulli(q)
against Bernoulli(p), a nonnegative martingale with mean 1 under p; a mixture over q of such
martingales is again one (Robbins' method of mixtures). Ville's inequality for a nonnegative
supermartingale with M_0 = 1 gives

    P_p( there exists n >= 0 with M_n(p) >= 1/alpha ) <= alpha,

so the sets C_n = {p : M_n(p) < 1/alpha} contain the true p at *all* n at once with
probability >= 1 - alpha, and hence also at any stopping time, or at any subsequence of times
(updating in chunks is fine). ``log M_n(p)`` is convex in p (a constant minus
``k log p + (n-k) log(1-p)``), and ``M_n(k/n) <= 1`` because a mixture of likelihoods never
exceeds the maximum likelihood, so C_n is an interval containing the MLE ``k/n``; its ends are
found by root-finding on each side of the MLE.

The lower end of C_n is a valid *one-sided* lower bound at level alpha: the event
"p_true < lower end" is contained in "p_true not in C_n", whose probability is at most alpha.
(It is not a one-sided bound at level alpha/2: the guarantee is that of the two-sided set.)

Cost: at a fixed n the set is wider than the Clopper-Pearson interval at the same alpha. For
interior p its half-width behaves like ``sqrt(2 p(1-p) (log(1/alpha) + (1/2) log n + O(1)) / n)``
instead of ``z_{alpha/2} sqrt(p(1-p)/n)``: the price of anytime validity is an extra
``log n``-order term under the square root. At ``k = n`` the lower end with the Jeffreys
mixture is about ``1 - (log(1/alpha) + (1/2) log(pi n)) / n`` against Clopper-Pearson's
``alpha^(1/n) ~ 1 - log(1/alpha)/n``.

Choice of prior: the default is the Jeffreys mixture Beta(1/2, 1/2). In certification the
interesting proportions are near 1 (top-class probability under noise) or near 0 (error rates);
there the Jeffreys mixture pays ``(1/2) log n`` nats where the uniform Beta(1, 1) mixture pays
``log n`` (at k = n: ``B(n + 1/2, 1/2)/B(1/2, 1/2) ~ 1/sqrt(pi n)`` against
``B(n + 1, 1) = 1/(n + 1)``), which gives visibly tighter lower bounds on a top-class
probability. Near p = 1/2 it costs only ``log(pi/2) ~ 0.45`` nats more than the uniform
mixture. Beta(1/2, 1/2) is also the Krichevsky-Trofimov mixture, whose regret against the
best p is within a constant of minimax uniformly in p.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np
from scipy import optimize, special, stats

__all__ = [
    "BetaBinomialConfidenceSequence",
    "ClopperPearsonLooks",
    "binomial_pvalue",
    "clopper_pearson_interval",
    "clopper_pearson_lower",
    "cs_lower_bound",
    "empirical_bernstein_radius",
    "geometric_looks",
    "hoeffding_radius",
    "smoothing_radius",
]


# --------------------------------------------------------------------------------------------
# validation helpers


def _as_int(value: object, name: str) -> int:
    try:
        # any object may come in: operator.index raises the TypeError handled below for non-integers
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None


def _check_counts(k: object, n: object, *, min_n: int = 1) -> tuple[int, int]:
    k_i, n_i = _as_int(k, "k"), _as_int(n, "n")
    if n_i < min_n:
        raise ValueError(f"n must be >= {min_n}, got {n_i}")
    if not 0 <= k_i <= n_i:
        raise ValueError(f"k must satisfy 0 <= k <= n, got k={k_i}, n={n_i}")
    return k_i, n_i


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:  # also rejects nan
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return alpha


def _check_positive(value: float, name: str) -> float:
    value = float(value)
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


class _Draws:
    """Successes and trials of i.i.d. Bernoulli draws counted so far (both 0 at the start)."""

    _k = 0
    _n = 0

    @property
    def k(self) -> int:
        """Successes counted so far."""
        return self._k

    @property
    def n(self) -> int:
        """Trials counted so far."""
        return self._n

    @staticmethod
    def _checked(successes: object, trials: object) -> tuple[int, int]:
        """``successes`` out of ``trials`` new draws as integers; ValueError unless
        ``0 <= successes <= trials``."""
        successes_i, trials_i = _as_int(successes, "successes"), _as_int(trials, "trials")
        if not 0 <= successes_i <= trials_i:
            raise ValueError(f"need 0 <= successes <= trials, got successes={successes_i}, trials={trials_i}")
        return successes_i, trials_i


# --------------------------------------------------------------------------------------------
# exact binomial bounds


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided exact lower confidence bound on a binomial proportion.

    Guarantee: if ``k ~ Binomial(n, p)`` with ``n`` fixed in advance, then
    ``P(clopper_pearson_lower(k, n, alpha) <= p) >= 1 - alpha`` for every p (conservative:
    the coverage is exact-or-more, never less). Equals ``Beta.ppf(alpha; k, n - k + 1)``, and
    0.0 when ``k == 0``. Raises ``ValueError`` unless ``0 <= k <= n``, ``n >= 1`` and
    ``0 < alpha < 1``.
    """
    k, n = _check_counts(k, n)
    alpha = _check_alpha(alpha)
    if k == 0:
        return 0.0
    return float(stats.beta.ppf(alpha, k, n - k + 1))


def clopper_pearson_interval(k: int, n: int, alpha: float) -> tuple[float, float]:
    """Two-sided exact (Clopper-Pearson) confidence interval at level ``1 - alpha``.

    Guarantee: for ``k ~ Binomial(n, p)`` with ``n`` fixed in advance,
    ``P(lo <= p <= hi) >= 1 - alpha``, with at most ``alpha/2`` of miscoverage on each side.
    ``lo = Beta.ppf(alpha/2; k, n-k+1)`` (0.0 at k == 0) and
    ``hi = Beta.ppf(1 - alpha/2; k+1, n-k)`` (1.0 at k == n). Same validation as
    :func:`clopper_pearson_lower`.
    """
    from bench.results.intervals import clopper_pearson

    k, n = _check_counts(k, n)
    return clopper_pearson(k, n, _check_alpha(alpha))


def binomial_pvalue(k: int, n: int) -> float:
    """Two-sided exact binomial test of ``H0: p = 1/2`` (the test in Cohen et al.'s PREDICT).

    Guarantee: under H0 (``k ~ Binomial(n, 1/2)``, n fixed), ``P(pvalue <= t) <= t`` for every
    t in [0, 1], so rejecting when ``pvalue <= alpha`` has type-I error at most alpha. In
    PREDICT, ``k`` is the top count among the two most frequent classes and ``n`` their total;
    abstaining unless ``pvalue <= alpha`` bounds the probability of returning a class other
    than the smoothed classifier's by alpha. Validation as :func:`clopper_pearson_lower`.
    """
    k, n = _check_counts(k, n)
    return float(stats.binomtest(k, n, 0.5).pvalue)


# --------------------------------------------------------------------------------------------
# concentration radii for bounded variables


def hoeffding_radius(n: int, value_range: float, alpha: float) -> float:
    """Hoeffding half-width ``value_range * sqrt(log(1/alpha) / (2 n))``.

    Guarantee: for ``n`` (fixed in advance) independent variables each in an interval of
    length ``value_range``, with sample mean ``m`` and mean of expectations ``mu``,
    ``P(m - mu >= t) <= alpha`` and, separately, ``P(mu - m >= t) <= alpha``. This is a
    one-sided bound; for a two-sided interval ``m +- t`` use ``alpha/2``. Raises
    ``ValueError`` unless ``n >= 1``, ``value_range > 0`` (finite) and ``0 < alpha < 1``.
    """
    n = _as_int(n, "n")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    value_range = _check_positive(value_range, "value_range")
    alpha = _check_alpha(alpha)
    return value_range * math.sqrt(math.log(1.0 / alpha) / (2.0 * n))


def empirical_bernstein_radius(sample_var: float, n: int, value_range: float, alpha: float) -> float:
    """Empirical Bernstein half-width (Maurer & Pontil 2009, Theorem 4).

    ``sqrt(2 V log(2/alpha) / n) + 7 R log(2/alpha) / (3 (n - 1))`` with ``V`` the *unbiased*
    sample variance (divisor ``n - 1``) and ``R = value_range``.

    Guarantee: for ``n >= 2`` (fixed in advance) i.i.d. variables in an interval of length R,
    with sample mean ``m`` and expectation ``mu``, ``P(mu - m > t) <= alpha``, where ``t`` is
    computed from the same sample's variance; by symmetry (apply it to ``-X``) also
    ``P(m - mu > t) <= alpha``. One-sided; use ``alpha/2`` for a two-sided interval. It is
    tighter than :func:`hoeffding_radius` when the variance is small relative to ``R**2``
    and looser near the maximal variance ``R**2 / 4``. Raises ``ValueError`` unless
    ``n >= 2``, ``sample_var >= 0`` (finite), ``value_range > 0`` and ``0 < alpha < 1``.
    """
    n = _as_int(n, "n")
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    sample_var = float(sample_var)
    if not (sample_var >= 0.0 and math.isfinite(sample_var)):
        raise ValueError(f"sample_var must be finite and >= 0, got {sample_var}")
    value_range = _check_positive(value_range, "value_range")
    alpha = _check_alpha(alpha)
    log_term = math.log(2.0 / alpha)
    return math.sqrt(2.0 * sample_var * log_term / n) + 7.0 * value_range * log_term / (3.0 * (n - 1))


# --------------------------------------------------------------------------------------------
# anytime-valid confidence sequence


def _cs_log_lower(k: int, n: int, alpha: float, a: float, b: float) -> float:
    """``log`` of the lower end of {p : M_n(p) < 1/alpha} for the Beta(a, b) mixture.

    Inputs are already validated. Solving in x = log p keeps full relative precision both for
    p near 0 and for 1 - p near 0. The root is moved down by the root finder's tolerance so
    that numerical error never makes the bound less conservative. Returns ``-inf`` when the
    lower end is 0 (k == 0 or no data).
    """
    if k == 0 or n == 0:
        return -math.inf
    # f(x) = log M_n(e^x) + log(alpha) = c - k x - (n - k) log(1 - e^x), decreasing for
    # x <= log(k/n) (the MLE), where f <= log(alpha) < 0 because M_n(k/n) <= 1.
    c = float(special.betaln(a + k, b + n - k) - special.betaln(a, b)) + math.log(alpha)
    m = n - k

    def f(x: float) -> float:
        value = c - k * x
        if m:
            value -= m * math.log(-math.expm1(x))
        return value

    x_hi = math.log(k / n)
    # -(n-k) log(1 - e^x) >= 0, so f(x) >= c - k x, which equals k > 0 at x_lo.
    x_lo = c / k - 1.0
    if not (f(x_lo) > 0.0 and x_lo < x_hi and f(x_hi) < 0.0):  # pragma: no cover - rounding guard
        raise FloatingPointError(f"confidence-sequence root not bracketed (k={k}, n={n}, alpha={alpha})")
    rtol = 4.0 * float(np.finfo(float).eps)
    xtol = 1e-300
    root = optimize.brentq(f, x_lo, x_hi, xtol=xtol, rtol=rtol, maxiter=1000)
    return min(root - 2.0 * (xtol + rtol * abs(root)), x_hi)


def _cs_lower(k: int, n: int, alpha: float, a: float, b: float) -> float:
    """Lower end of the confidence set (0.0 when k == 0 or n == 0)."""
    return math.exp(_cs_log_lower(k, n, alpha, a, b))


def _cs_upper(k: int, n: int, alpha: float, a: float, b: float) -> float:
    """Upper end, by the symmetry p -> 1 - p (k -> n - k, a <-> b); 1.0 when k == n or n == 0."""
    return -math.expm1(_cs_log_lower(n - k, n, alpha, b, a))


def cs_lower_bound(k: int, n: int, alpha: float, a: float = 0.5, b: float = 0.5) -> float:
    """Lower end of the Beta(a, b)-mixture confidence sequence after ``k`` successes in ``n``.

    Guarantee: for i.i.d. Bernoulli(p) draws, ``P(cs_lower_bound(k_n, n, alpha) <= p for
    every n) >= 1 - alpha``; so the bound stays valid when ``n`` is a data-dependent stopping
    time (sampling until the bound clears a threshold is allowed). At a fixed n it is lower
    than :func:`clopper_pearson_lower`. ``n == 0`` gives 0.0. Raises ``ValueError`` unless
    ``0 <= k <= n``, ``0 < alpha < 1`` and ``a, b > 0``. See the module docstring.
    """
    k, n = _check_counts(k, n, min_n=0)
    alpha = _check_alpha(alpha)
    a = _check_positive(a, "a")
    b = _check_positive(b, "b")
    return _cs_lower(k, n, alpha, a, b)


class BetaBinomialConfidenceSequence(_Draws):
    """Anytime-valid confidence sequence for a Bernoulli mean (Beta(a, b) mixture martingale).

    Guarantee: if the counts passed to :meth:`update` come from i.i.d. Bernoulli(p) draws
    (how many to draw next may be chosen from what was seen so far, and sampling may stop at
    any time), then with probability at least ``1 - alpha`` the interval
    ``[lower(), upper()]`` contains p after *every* update simultaneously; hence it is valid
    at any stopping time. The lower end alone is a one-sided lower bound at level alpha.
    Default prior Beta(1/2, 1/2) (Jeffreys/Krichevsky-Trofimov): tighter than the uniform
    mixture for proportions near 0 or 1, which is where certification operates; see the
    module docstring. Before any update the interval is [0, 1].
    """

    def __init__(self, alpha: float, a: float = 0.5, b: float = 0.5) -> None:
        self._alpha = _check_alpha(alpha)
        self._a = _check_positive(a, "a")
        self._b = _check_positive(b, "b")
        self._cache: tuple[int, int, float, float] | None = None

    @property
    def alpha(self) -> float:
        """Miscoverage level of the whole sequence."""
        return self._alpha

    def update(self, successes: int, trials: int) -> None:
        """Add ``successes`` out of ``trials`` new draws (``0 <= successes <= trials``)."""
        successes, trials = self._checked(successes, trials)
        self._k += successes
        self._n += trials

    def _bounds(self) -> tuple[float, float]:
        cache = self._cache
        if cache is not None and cache[0] == self._k and cache[1] == self._n:
            return cache[2], cache[3]
        lo = _cs_lower(self._k, self._n, self._alpha, self._a, self._b)
        hi = _cs_upper(self._k, self._n, self._alpha, self._a, self._b)
        self._cache = (self._k, self._n, lo, hi)
        return lo, hi

    def lower(self) -> float:
        """Lower end of ``{p : M_n(p) < 1/alpha}``; 0.0 before any data or when ``k == 0``."""
        return self._bounds()[0]

    def upper(self) -> float:
        """Upper end of ``{p : M_n(p) < 1/alpha}``; 1.0 before any data or when ``k == n``."""
        return self._bounds()[1]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(alpha={self._alpha}, a={self._a}, b={self._b}, "
            f"k={self._k}, n={self._n})"
        )


# --------------------------------------------------------------------------------------------
# Clopper-Pearson at looks fixed in advance


def geometric_looks(first: int, growth: float, n: int) -> list[int]:
    """Cumulative sample counts ``t_1 < ... < t_L = n`` of rounds that start at ``first`` samples
    and grow by ``growth`` (each round ``int(growth * previous)``, the last one cut at ``n``).
    Depends only on its arguments, so the looks are fixed before any data is seen."""
    first, n = _as_int(first, "first"), _as_int(n, "n")
    if first < 1 or n < 1:
        raise ValueError(f"first and n must be >= 1, got first={first}, n={n}")
    if not (growth >= 1.0 and math.isfinite(growth)):
        raise ValueError(f"growth must be finite and >= 1, got {growth}")
    looks, step, total = [], min(first, n), 0
    while total < n:
        total += step
        looks.append(total)
        step = max(1, min(int(step * growth), n - total))
    return looks


class ClopperPearsonLooks(_Draws):
    """Lower confidence bounds on a Bernoulli mean at looks fixed in advance (union bound).

    Guarantee: let the looks ``t_1 < ... < t_L`` be fixed before any data, and ``k_i`` be the
    successes among the first ``t_i`` of i.i.d. Bernoulli(p) draws. Each one-sided
    Clopper-Pearson bound ``clopper_pearson_lower(k_i, t_i, alpha / L)`` exceeds p with
    probability at most ``alpha / L`` (its fixed-n guarantee: ``t_i`` is fixed), so by the union
    bound, with probability at least ``1 - alpha`` **every** look's bound is at most p at once.
    On that event :meth:`lower`, the largest bound of the looks taken so far, is at most p
    whatever they were, so it stays valid when sampling stops at a data-dependent look, or when
    later looks are never taken (the failure event is defined on the whole sequence of draws).

    :meth:`update` must land exactly on the next looks (a round may span several); a count
    ending between looks raises ``ValueError``: a bound at a time outside the schedule is not
    covered by the union bound. Against a confidence sequence valid at every n, the price of
    validity at L looks is ``log L`` nats in ``log(1/alpha)`` instead of about ``(1/2) log n``.
    """

    def __init__(self, looks: Sequence[int], alpha: float) -> None:
        times = [_as_int(t, "look") for t in looks]
        if not times or times[0] < 1 or any(b <= a for a, b in zip(times, times[1:])):
            raise ValueError(f"looks must be increasing positive integers, got {list(looks)}")
        self.looks = tuple(times)
        self.alpha = _check_alpha(alpha)
        self.level = self.alpha / len(times)  # each look's share of alpha
        self._taken = 0  # looks taken: ``n`` is ``looks[_taken - 1]``, or 0
        self._lower = 0.0

    @property
    def done(self) -> bool:
        """Whether the last look has been taken."""
        return self._taken == len(self.looks)

    def next_look(self) -> int:
        """Trials to draw to reach the next look (ValueError after the last)."""
        if self.done:
            raise ValueError(f"all {len(self.looks)} looks are taken")
        return self.looks[self._taken] - self._n

    def update(self, successes: int, trials: int) -> None:
        """Add ``successes`` out of ``trials`` new draws, ending exactly on a look."""
        successes, trials = self._checked(successes, trials)
        n = self._n + trials
        if n not in self.looks[self._taken:]:
            raise ValueError(f"{n} trials is not one of the looks fixed in advance {list(self.looks)}")
        self._k += successes
        self._n = n
        self._taken = self.looks.index(n) + 1
        self._lower = max(self._lower, clopper_pearson_lower(self._k, n, self.level))

    def lower(self) -> float:
        """The largest Clopper-Pearson bound at level ``alpha / L`` over the looks taken so far
        (0.0 before the first)."""
        return self._lower

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alpha={self.alpha}, looks={len(self.looks)}, k={self._k}, n={self._n})"


# --------------------------------------------------------------------------------------------
# randomized smoothing


def smoothing_radius(p_lower: float, sigma: float) -> float:
    """Certified L2 radius ``sigma * Phi^{-1}(p_lower)`` (Cohen et al. 2019, Theorem 1).

    Guarantee: if ``p_lower`` is a lower bound on the probability ``p_A`` that the base
    classifier returns class A under ``N(0, sigma^2 I)`` noise (and ``p_B = 1 - p_lower``
    bounds every other class), then the smoothed classifier returns A at every point within
    L2 distance ``< radius`` of the input. The statistical confidence of the certificate is
    that of ``p_lower``. Callers abstain when ``p_lower <= 1/2``; this function raises
    ``ValueError`` there (and for ``p_lower > 1`` or a non-positive sigma) and returns ``inf``
    for ``p_lower == 1``.
    """
    p_lower = float(p_lower)
    if not 0.5 < p_lower <= 1.0:
        raise ValueError(f"p_lower must be in (1/2, 1] to certify, got {p_lower}")
    sigma = _check_positive(sigma, "sigma")
    if p_lower == 1.0:
        return math.inf
    return sigma * float(stats.norm.ppf(p_lower))
