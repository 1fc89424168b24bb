"""Behavioural tests for bench.certifiers.stats (exact bounds, radii, bounds at looks, confidence sequence)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special, stats

from bench.certifiers.stats import (
    BetaBinomialConfidenceSequence,
    ClopperPearsonLooks,
    binomial_pvalue,
    clopper_pearson_interval,
    clopper_pearson_lower,
    cs_lower_bound,
    empirical_bernstein_radius,
    geometric_looks,
    hoeffding_radius,
    smoothing_radius,
)

TYPICAL = [(3, 10, 0.05), (50, 100, 0.1), (990, 1000, 0.001), (99_950, 100_000, 0.001), (1, 7, 0.2)]
EDGES = [(0, 1, 0.05), (1, 1, 0.05), (0, 20, 0.01), (20, 20, 0.01), (0, 100_000, 0.001), (100_000, 100_000, 0.001)]


def _log_m(k: int, n: int, p: float, a: float = 0.5, b: float = 0.5) -> float:
    """log M_n(p) computed independently of the module (plain formula)."""
    value = special.betaln(a + k, b + n - k) - special.betaln(a, b)
    if k:
        value -= k * math.log(p)
    if n - k:
        value -= (n - k) * math.log1p(-p)
    return float(value)


# ---------------------------------------------------------------------------------------------
# Clopper-Pearson


@pytest.mark.parametrize("k,n,alpha", TYPICAL + EDGES)
def test_clopper_pearson_matches_scipy(k, n, alpha):
    lo, hi = clopper_pearson_interval(k, n, alpha)
    ref = stats.binomtest(k, n).proportion_ci(confidence_level=1 - alpha, method="exact")
    assert lo == pytest.approx(ref.low, rel=1e-9, abs=1e-15)
    assert hi == pytest.approx(ref.high, rel=1e-9, abs=1e-15)

    one_sided = clopper_pearson_lower(k, n, alpha)
    ref1 = stats.binomtest(k, n, alternative="greater").proportion_ci(confidence_level=1 - alpha, method="exact")
    assert one_sided == pytest.approx(ref1.low, rel=1e-9, abs=1e-15)
    expected = 0.0 if k == 0 else stats.beta.ppf(alpha, k, n - k + 1)
    assert one_sided == pytest.approx(expected, rel=1e-12, abs=0.0)
    # the one-sided bound at alpha is the two-sided lower end at 2 * alpha, and tighter than at alpha
    assert one_sided == pytest.approx(clopper_pearson_interval(k, n, 2 * alpha)[0], rel=1e-12, abs=0.0)
    assert one_sided >= lo
    assert lo <= k / n <= hi


def test_clopper_pearson_edge_values():
    assert clopper_pearson_lower(0, 10, 0.05) == 0.0
    assert clopper_pearson_interval(0, 10, 0.05)[0] == 0.0
    assert clopper_pearson_interval(10, 10, 0.05)[1] == 1.0
    # k == n: P(X = n | p) = p^n = alpha  =>  lower = alpha^(1/n)
    for n in (1, 2, 10, 1000):
        assert clopper_pearson_lower(n, n, 0.01) == pytest.approx(0.01 ** (1 / n), rel=1e-10)
    # k == 0: upper end solves (1 - p)^n = alpha/2
    assert clopper_pearson_interval(0, 50, 0.1)[1] == pytest.approx(1 - 0.05 ** (1 / 50), rel=1e-10)
    # n == 1
    assert clopper_pearson_interval(1, 1, 0.1) == pytest.approx((0.05, 1.0))
    assert clopper_pearson_interval(0, 1, 0.1) == pytest.approx((0.0, 0.95))


def test_clopper_pearson_lower_monotone_in_k_and_n():
    n, alpha = 200, 0.01
    lows = [clopper_pearson_lower(k, n, alpha) for k in range(n + 1)]
    assert lows[0] == 0.0
    assert all(b > a for a, b in zip(lows, lows[1:]))

    for frac in (0.5, 0.9, 1.0):
        seq = [clopper_pearson_lower(round(frac * n), n, alpha) for n in (10, 20, 50, 100, 1000, 10_000)]
        assert all(b > a for a, b in zip(seq, seq[1:])), (frac, seq)
        assert seq[-1] < frac


def test_clopper_pearson_coverage_is_exact_or_conservative():
    # exact coverage over all outcomes: sum of binomial pmf where the bound holds
    n, alpha = 30, 0.05
    for p in (0.05, 0.3, 0.5, 0.8, 0.97):
        pmf = stats.binom.pmf(np.arange(n + 1), n, p)
        covered = np.array([clopper_pearson_lower(k, n, alpha) <= p for k in range(n + 1)])
        assert pmf[covered].sum() >= 1 - alpha - 1e-12
        lo_hi = [clopper_pearson_interval(k, n, alpha) for k in range(n + 1)]
        covered2 = np.array([lo <= p <= hi for lo, hi in lo_hi])
        assert pmf[covered2].sum() >= 1 - alpha - 1e-12


# ---------------------------------------------------------------------------------------------
# binomial test


@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (0, 10), (5, 10), (7, 10), (60, 100), (100, 100)])
def test_binomial_pvalue_matches_scipy(k, n):
    assert binomial_pvalue(k, n) == pytest.approx(stats.binomtest(k, n, 0.5).pvalue, rel=1e-12)
    assert binomial_pvalue(k, n) == pytest.approx(binomial_pvalue(n - k, n), rel=1e-12)


def test_binomial_pvalue_values():
    assert binomial_pvalue(5, 10) == pytest.approx(1.0)
    assert binomial_pvalue(0, 10) == pytest.approx(2 * 0.5**10)
    assert binomial_pvalue(90, 100) < 1e-10
    # p-value decreases as the split becomes more lopsided
    ps = [binomial_pvalue(k, 100) for k in range(50, 101)]
    assert all(b <= a for a, b in zip(ps, ps[1:]))


# ---------------------------------------------------------------------------------------------
# Hoeffding / empirical Bernstein


def test_hoeffding_formula():
    assert hoeffding_radius(100, 1.0, 0.05) == pytest.approx(math.sqrt(math.log(20) / 200))
    assert hoeffding_radius(100, 3.0, 0.05) == pytest.approx(3 * hoeffding_radius(100, 1.0, 0.05))
    assert hoeffding_radius(400, 1.0, 0.05) == pytest.approx(hoeffding_radius(100, 1.0, 0.05) / 2)
    assert hoeffding_radius(100, 1.0, 0.01) > hoeffding_radius(100, 1.0, 0.05)


def test_empirical_bernstein_formula():
    v, n, r, a = 0.02, 500, 2.0, 0.05
    expected = math.sqrt(2 * v * math.log(2 / a) / n) + 7 * r * math.log(2 / a) / (3 * (n - 1))
    assert empirical_bernstein_radius(v, n, r, a) == pytest.approx(expected)
    assert empirical_bernstein_radius(0.0, n, r, a) == pytest.approx(7 * r * math.log(2 / a) / (3 * (n - 1)))


def test_hoeffding_coverage_by_simulation():
    rng = np.random.default_rng(1234)
    reps, n, alpha = 2000, 50, 0.1
    slack = 0.02
    for p in (0.5, 0.1):
        x = (rng.random((reps, n)) < p).astype(float)
        dev = x.mean(axis=1) - p
        t = hoeffding_radius(n, 1.0, alpha)
        assert np.mean(dev >= t) <= alpha + slack
        assert np.mean(-dev >= t) <= alpha + slack
    # the simulation can tell: a radius three times too small fails far more often than alpha
    x = (rng.random((reps, n)) < 0.5).astype(float)
    assert np.mean(x.mean(axis=1) - 0.5 >= hoeffding_radius(n, 1.0, alpha) / 3) > alpha + slack


def test_empirical_bernstein_coverage_by_simulation():
    rng = np.random.default_rng(99)
    reps, n, alpha = 2000, 200, 0.1
    slack = 0.02
    # values in [0, 2] (R = 2); Beta(2, 5) scaled by 2, mean 2 * 2/7
    x = 2.0 * rng.beta(2.0, 5.0, size=(reps, n))
    mu = 4.0 / 7.0
    var = x.var(axis=1, ddof=1)
    t = np.array([empirical_bernstein_radius(v, n, 2.0, alpha) for v in var])
    m = x.mean(axis=1)
    assert np.mean(mu - m > t) <= alpha + slack
    assert np.mean(m - mu > t) <= alpha + slack
    # same low-variance data: Bernstein is the tighter radius here
    assert np.all(t < hoeffding_radius(n, 2.0, alpha))


def test_bernstein_tighter_than_hoeffding_for_low_variance_only():
    n, r, alpha = 10_000, 1.0, 0.05
    h = hoeffding_radius(n, r, alpha)
    assert empirical_bernstein_radius(0.001, n, r, alpha) < h / 2
    assert empirical_bernstein_radius(0.01, n, r, alpha) < h
    # near the maximal variance R^2/4 Hoeffding wins
    assert empirical_bernstein_radius(0.25, n, r, alpha) > h
    # and the radius grows with variance
    radii = [empirical_bernstein_radius(v, n, r, alpha) for v in (0.0, 0.01, 0.05, 0.1, 0.25)]
    assert all(b > a for a, b in zip(radii, radii[1:]))


# ---------------------------------------------------------------------------------------------
# confidence sequence


def test_cs_initial_state_and_edges():
    cs = BetaBinomialConfidenceSequence(0.05)
    assert (cs.k, cs.n) == (0, 0)
    assert cs.lower() == 0.0 and cs.upper() == 1.0

    cs.update(0, 100)
    assert cs.lower() == 0.0
    assert 0.0 < cs.upper() < 0.1
    assert cs_lower_bound(0, 100, 0.05) == 0.0
    assert cs_lower_bound(0, 0, 0.05) == 0.0

    full = BetaBinomialConfidenceSequence(0.05)
    full.update(100, 100)
    assert full.upper() == 1.0
    assert 0.9 < full.lower() < 1.0
    # k = n: M_n(p) = B(a + n, b) / (B(a, b) p^n), so the lower end is closed form
    n, alpha = 100, 0.05
    closed = math.exp((special.betaln(0.5 + n, 0.5) - special.betaln(0.5, 0.5) + math.log(alpha)) / n)
    assert full.lower() == pytest.approx(closed, rel=1e-10)


def test_cs_update_accumulates_and_matches_function():
    cs = BetaBinomialConfidenceSequence(0.01)
    for s, t in [(3, 10), (0, 5), (7, 7), (40, 50), (0, 0)]:
        cs.update(s, t)
    assert (cs.k, cs.n) == (50, 72)
    assert cs.lower() == pytest.approx(cs_lower_bound(50, 72, 0.01), rel=1e-12)
    one_shot = BetaBinomialConfidenceSequence(0.01)
    one_shot.update(50, 72)
    assert (one_shot.lower(), one_shot.upper()) == (cs.lower(), cs.upper())
    # numpy integers are accepted
    cs.update(np.int64(1), np.int64(2))
    assert (cs.k, cs.n) == (51, 74)


@pytest.mark.parametrize("k,n,alpha", [(1, 1, 0.1), (3, 10, 0.05), (50, 100, 0.1), (990, 1000, 0.001),
                                       (99_999, 100_000, 0.001), (7, 1_000_000, 0.01)])
def test_cs_endpoints_solve_the_defining_equation(k, n, alpha):
    cs = BetaBinomialConfidenceSequence(alpha)
    cs.update(k, n)
    lo, hi = cs.lower(), cs.upper()
    assert 0.0 < lo <= k / n <= hi <= 1.0
    target = math.log(1 / alpha)
    assert _log_m(k, n, lo) == pytest.approx(target, rel=1e-6)
    if k < n:
        assert _log_m(k, n, hi) == pytest.approx(target, rel=1e-6)
    # inside the set M_n < 1/alpha, just outside it M_n > 1/alpha
    assert _log_m(k, n, k / n) < target
    assert _log_m(k, n, lo * (1 - 1e-4)) > target
    if k < n:
        assert _log_m(k, n, hi + (1 - hi) * 1e-4) > target
    # the lower end never errs on the optimistic side of the root
    assert _log_m(k, n, lo) >= target - 1e-9


def test_cs_contains_mle_on_a_grid():
    for n in (1, 2, 5, 37, 1000):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            if not 0 <= k <= n:
                continue
            cs = BetaBinomialConfidenceSequence(0.05)
            cs.update(k, n)
            assert cs.lower() <= k / n <= cs.upper()
            assert (cs.lower() == 0.0) == (k == 0)
            assert (cs.upper() == 1.0) == (k == n)


def test_cs_symmetry_under_relabelling():
    for k, n in [(3, 10), (1, 50), (900, 1000)]:
        a = BetaBinomialConfidenceSequence(0.05, 0.5, 2.0)
        a.update(k, n)
        b = BetaBinomialConfidenceSequence(0.05, 2.0, 0.5)
        b.update(n - k, n)
        assert a.lower() == pytest.approx(1 - b.upper(), rel=1e-9, abs=1e-15)
        assert a.upper() == pytest.approx(1 - b.lower(), rel=1e-9, abs=1e-15)


def test_cs_wider_than_clopper_pearson_at_fixed_n():
    alpha = 0.05
    for n in (10, 100, 1000, 100_000):
        for k in sorted({0, 1, n // 10, n // 2, (9 * n) // 10, n - 1, n}):
            cs = BetaBinomialConfidenceSequence(alpha)
            cs.update(k, n)
            lo, hi = clopper_pearson_interval(k, n, alpha)
            assert cs.lower() <= lo
            assert cs.upper() >= hi
            assert cs.lower() <= clopper_pearson_lower(k, n, alpha)
            if 0 < k < n:
                assert cs.lower() < lo and cs.upper() > hi
    # the cost is modest: a log factor, not a constant factor in n
    k, n = 99_900, 100_000
    gap_cs = k / n - cs_lower_bound(k, n, 0.001)
    gap_cp = k / n - clopper_pearson_lower(k, n, 0.001)
    assert 1.0 < gap_cs / gap_cp < 2.0


def test_cs_shrinks_as_n_grows():
    for frac in (0.0, 0.3, 0.5, 0.99, 1.0):
        widths, lows = [], []
        for n in (10, 100, 1000, 10_000, 100_000):
            cs = BetaBinomialConfidenceSequence(0.05)
            cs.update(round(frac * n), n)
            widths.append(cs.upper() - cs.lower())
            lows.append(cs.lower())
        assert all(b < a for a, b in zip(widths, widths[1:])), (frac, widths)
        if frac > 0:
            assert all(b > a for a, b in zip(lows, lows[1:])), (frac, lows)


def test_cs_lower_monotone_in_k():
    n = 300
    lows = [cs_lower_bound(k, n, 0.05) for k in range(n + 1)]
    assert lows[0] == 0.0
    assert all(b > a for a, b in zip(lows, lows[1:]))


def test_cs_jeffreys_prior_tighter_near_one():
    # the default prior pays less at the boundary, where certification operates
    for k, n in [(100_000, 100_000), (99_990, 100_000), (1000, 1000)]:
        assert cs_lower_bound(k, n, 0.001) > cs_lower_bound(k, n, 0.001, a=1.0, b=1.0)


@pytest.mark.parametrize("p", [0.3, 0.95])
def test_cs_time_uniform_coverage_by_simulation(p):
    """Ville: P(p escapes the interval at *any* update) <= alpha; peeking at CP is not valid."""
    rng = np.random.default_rng(20240 + int(100 * p))
    paths, steps, chunk, alpha = 300, 2000, 20, 0.1
    slack = 0.03
    draws = rng.random((paths, steps)) < p
    counts = draws.reshape(paths, steps // chunk, chunk).sum(axis=2)

    cs_fail = 0
    for row in counts:
        cs = BetaBinomialConfidenceSequence(alpha)
        for s in row:
            cs.update(int(s), chunk)
            if not cs.lower() <= p <= cs.upper():
                cs_fail += 1
                break
    assert cs_fail / paths <= alpha + slack

    # the same simulation detects an invalid procedure: Clopper-Pearson recomputed after every
    # chunk ("peeking") misses the true p on some update far more often than alpha
    k = np.cumsum(counts, axis=1)
    n = chunk * np.arange(1, steps // chunk + 1)
    lo = np.where(k > 0, stats.beta.ppf(alpha / 2, np.maximum(k, 1), n - k + 1), 0.0)
    hi = np.where(k < n, stats.beta.ppf(1 - alpha / 2, k + 1, np.maximum(n - k, 1)), 1.0)
    cp_fail = np.mean(np.any((lo > p) | (hi < p), axis=1))
    assert cp_fail > alpha + slack
    assert cs_fail / paths < cp_fail


def test_cs_excludes_a_wrong_p_eventually():
    rng = np.random.default_rng(7)
    cs = BetaBinomialConfidenceSequence(0.05)
    for _ in range(50):
        cs.update(int((rng.random(200) < 0.5).sum()), 200)
    assert not cs.lower() <= 0.45 <= cs.upper()
    assert cs.lower() <= 0.5 <= cs.upper()


# ---------------------------------------------------------------------------------------------
# smoothing radius


def test_smoothing_radius_values_and_monotonicity():
    assert smoothing_radius(stats.norm.cdf(1.0), 0.25) == pytest.approx(0.25)
    assert smoothing_radius(0.99, 0.5) == pytest.approx(0.5 * stats.norm.ppf(0.99))
    assert smoothing_radius(0.9, 1.0) == pytest.approx(2 * smoothing_radius(0.9, 0.5))
    ps = np.linspace(0.5001, 0.9999, 50)
    radii = [smoothing_radius(float(q), 0.5) for q in ps]
    assert radii[0] > 0.0
    assert all(b > a for a, b in zip(radii, radii[1:]))
    assert smoothing_radius(1.0, 0.5) == math.inf


@pytest.mark.parametrize("p_lower", [0.5, 0.4999, 0.0, -0.1, 1.0000001, float("nan")])
def test_smoothing_radius_rejects_non_certifiable(p_lower):
    with pytest.raises(ValueError):
        smoothing_radius(p_lower, 0.25)


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("inf"), float("nan")])
def test_smoothing_radius_rejects_bad_sigma(sigma):
    with pytest.raises(ValueError):
        smoothing_radius(0.9, sigma)


def test_end_to_end_certificate_from_counts():
    # CERTIFY: 9990 of 10000 noisy votes for the top class, alpha = 0.001, sigma = 0.5
    p_a = clopper_pearson_lower(9990, 10_000, 0.001)
    assert 0.5 < p_a < 0.999
    r_cp = smoothing_radius(p_a, 0.5)
    r_cs = smoothing_radius(cs_lower_bound(9990, 10_000, 0.001), 0.5)
    assert 0.0 < r_cs < r_cp < 0.5 * stats.norm.ppf(0.999)


# ---------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "call",
    [
        lambda: clopper_pearson_lower(-1, 10, 0.05),
        lambda: clopper_pearson_lower(11, 10, 0.05),
        lambda: clopper_pearson_lower(0, 0, 0.05),
        lambda: clopper_pearson_lower(1, 10, 0.0),
        lambda: clopper_pearson_lower(1, 10, 1.0),
        lambda: clopper_pearson_lower(1, 10, float("nan")),
        lambda: clopper_pearson_interval(5, 4, 0.05),
        lambda: clopper_pearson_interval(1, 4, 1.5),
        lambda: binomial_pvalue(3, 2),
        lambda: binomial_pvalue(0, 0),
        lambda: hoeffding_radius(0, 1.0, 0.05),
        lambda: hoeffding_radius(10, 0.0, 0.05),
        lambda: hoeffding_radius(10, -1.0, 0.05),
        lambda: hoeffding_radius(10, 1.0, 0.0),
        lambda: empirical_bernstein_radius(0.1, 1, 1.0, 0.05),
        lambda: empirical_bernstein_radius(-0.1, 10, 1.0, 0.05),
        lambda: empirical_bernstein_radius(float("nan"), 10, 1.0, 0.05),
        lambda: empirical_bernstein_radius(0.1, 10, 0.0, 0.05),
        lambda: empirical_bernstein_radius(0.1, 10, 1.0, 1.0),
        lambda: cs_lower_bound(5, 4, 0.05),
        lambda: cs_lower_bound(1, 4, 0.0),
        lambda: cs_lower_bound(1, 4, 0.05, a=0.0),
        lambda: BetaBinomialConfidenceSequence(0.0),
        lambda: BetaBinomialConfidenceSequence(1.0),
        lambda: BetaBinomialConfidenceSequence(0.05, a=-1.0),
        lambda: BetaBinomialConfidenceSequence(0.05, b=0.0),
        lambda: BetaBinomialConfidenceSequence(0.05).update(3, 2),
        lambda: BetaBinomialConfidenceSequence(0.05).update(-1, 2),
        lambda: BetaBinomialConfidenceSequence(0.05).update(0, -1),
    ],
)
def test_validation_errors(call):
    with pytest.raises(ValueError):
        call()


def test_failed_update_leaves_state_unchanged():
    cs = BetaBinomialConfidenceSequence(0.05)
    cs.update(3, 10)
    with pytest.raises(ValueError):
        cs.update(5, 4)
    assert (cs.k, cs.n) == (3, 10)


def test_non_integer_counts_are_rejected():
    with pytest.raises(TypeError):
        clopper_pearson_lower(2.5, 10, 0.05)
    with pytest.raises(TypeError):
        BetaBinomialConfidenceSequence(0.05).update(1.0, 2)


# ---------------------------------------------------------------------------------------------
# Clopper-Pearson at looks fixed in advance


def test_geometric_looks_grow_by_the_factor_and_end_at_n():
    looks = geometric_looks(1000, 1.25, 100_000)
    assert looks[:4] == [1000, 2250, 3812, 5764]  # rounds of 1,000, 1,250, 1,562, 1,952
    assert looks[-1] == 100_000 and all(b > a for a, b in zip(looks, looks[1:]))
    steps = [b - a for a, b in zip([0, *looks], looks)]
    assert all(b == int(1.25 * a) for a, b in zip(steps[:-2], steps[1:-1]))  # the last round is cut at n
    assert geometric_looks(1000, 1.25, 300) == [300]
    assert geometric_looks(1, 1.0, 3) == [1, 2, 3]
    for bad in ((0, 1.25, 10), (10, 0.5, 10), (10, math.inf, 10), (10, 1.25, 0)):
        with pytest.raises(ValueError):
            geometric_looks(*bad)


def test_looks_bound_is_clopper_pearson_at_alpha_over_the_looks_and_keeps_the_largest():
    one = ClopperPearsonLooks([500], 0.01)
    one.update(480, 500)
    assert one.lower() == clopper_pearson_lower(480, 500, 0.01) and one.done
    looks = ClopperPearsonLooks([100, 200, 400], 0.03)
    assert looks.level == pytest.approx(0.01) and looks.lower() == 0.0 and looks.next_look() == 100
    looks.update(100, 100)  # all votes: a high first bound
    first = clopper_pearson_lower(100, 100, 0.01)
    assert looks.lower() == first and looks.next_look() == 100
    looks.update(60, 300)  # a round may span looks; the bound at 400 is lower and does not replace it
    assert clopper_pearson_lower(160, 400, 0.01) < first == looks.lower()
    assert (looks.k, looks.n, looks.done) == (160, 400, True)
    with pytest.raises(ValueError, match="looks are taken"):
        looks.next_look()


def test_looks_refuse_counts_outside_the_schedule():
    looks = ClopperPearsonLooks([100, 200], 0.05)
    with pytest.raises(ValueError, match="not one of the looks"):
        looks.update(50, 150)  # a bound at 150 is not covered by the union bound
    assert (looks.k, looks.n, looks.lower()) == (0, 0, 0.0)  # unchanged
    with pytest.raises(ValueError):
        looks.update(101, 100)
    for bad in ([], [0, 10], [10, 10], [20, 10]):
        with pytest.raises(ValueError):
            ClopperPearsonLooks(bad, 0.05)
    with pytest.raises(ValueError):
        ClopperPearsonLooks([10], 1.0)


def test_looks_bound_holds_under_the_worst_stopping_rule_by_simulation():
    """The union bound: a sampler that stops at the first look whose bound exceeds the true p (the
    stopping rule that makes the reported bound wrong as often as possible) is wrong at most alpha
    of the time; Clopper-Pearson at the full alpha at the same looks ("peeking") is not."""
    p, alpha, paths = 0.9, 0.2, 1500
    schedule = geometric_looks(20, 1.25, 2000)
    rng = np.random.default_rng(17)
    steps = np.diff([0, *schedule])
    counts = rng.binomial(steps, p, size=(paths, len(steps)))
    wrong = 0
    for row in counts:
        looks = ClopperPearsonLooks(schedule, alpha)
        for successes, trials in zip(row, steps):
            looks.update(int(successes), int(trials))
            if looks.lower() > p:
                wrong += 1
                break
    slack = 3 * math.sqrt(alpha * (1 - alpha) / paths)
    assert wrong / paths <= alpha + slack
    k = np.cumsum(counts, axis=1)
    peeking = np.where(k > 0, stats.beta.ppf(alpha, np.maximum(k, 1), np.array(schedule) - k + 1), 0.0)
    peek_wrong = float(np.mean(np.any(peeking > p, axis=1)))
    assert peek_wrong > alpha + slack and wrong / paths < peek_wrong
