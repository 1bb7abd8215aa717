"""stats against independent formulas: binomial tails, beta quantiles, binomtest, Theorem 6."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from pipeline import stats

GRID = [(k, n) for n in (1, 2, 5, 10, 100, 1000, 100_000) for k in sorted({0, 1, n // 3, n // 2, n - 1, n})]


@pytest.mark.parametrize("alpha", [0.001, 0.05])
@pytest.mark.parametrize(("k", "n"), GRID)
def test_clopper_pearson_inverts_the_binomial_tail(k, n, alpha):
    lower = stats.clopper_pearson_lower(k, n, alpha)
    upper = stats.clopper_pearson_upper(k, n, alpha)
    assert 0.0 <= lower <= k / n <= upper <= 1.0
    if k == 0:
        assert lower == 0.0
        assert upper == pytest.approx(1 - alpha ** (1 / n), rel=1e-9)
    else:  # the lower bound is the p at which seeing >= k successes has probability alpha
        assert sps.binom.sf(k - 1, n, lower) == pytest.approx(alpha, rel=1e-6)
    if k == n:
        assert upper == 1.0
        assert lower == pytest.approx(alpha ** (1 / n), rel=1e-9)
    else:  # the upper bound is the p at which seeing <= k successes has probability alpha
        assert sps.binom.cdf(k, n, upper) == pytest.approx(alpha, rel=1e-6)


def test_clopper_pearson_is_vectorised():
    k, n = np.array([0, 3, 10]), np.array([10, 10, 10])
    np.testing.assert_allclose(stats.clopper_pearson_lower(k, n, 0.01),
                               [stats.clopper_pearson_lower(int(a), 10, 0.01) for a in k])


def test_clopper_pearson_matches_two_sided_interval_at_twice_alpha():
    # Cohen's code: statsmodels proportion_confint(k, n, alpha=2 alpha, method="beta")[0]
    k, n, alpha = 9871, 10_000, 0.001
    assert stats.clopper_pearson_lower(k, n, alpha) == pytest.approx(sps.beta.ppf(alpha, k, n - k + 1), rel=1e-12)
    interval = sps.binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact")
    assert stats.clopper_pearson_lower(k, n, alpha) == pytest.approx(interval.low, rel=1e-9)
    assert stats.clopper_pearson_upper(k, n, alpha) == pytest.approx(interval.high, rel=1e-9)


@pytest.mark.parametrize(("bad_k", "bad_n"), [(-1, 10), (11, 10), (0, 0)])
def test_clopper_pearson_rejects_impossible_counts(bad_k, bad_n):
    with pytest.raises(ValueError, match=r"n must|counts must"):
        stats.clopper_pearson_lower(bad_k, bad_n, 0.01)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5])
def test_alpha_outside_unit_interval_is_rejected(alpha):
    with pytest.raises(ValueError, match="alpha"):
        stats.clopper_pearson_upper(3, 10, alpha)


def test_simultaneous_bounds_split_alpha_over_classes():
    counts = np.array([0, 5, 120, 9875])
    lower, upper = stats.simultaneous_bounds(counts, 0.001, "simuem")
    np.testing.assert_allclose(lower, [stats.clopper_pearson_lower(c, 10_000, 0.001 / 4) for c in counts])
    np.testing.assert_allclose(upper, [stats.clopper_pearson_upper(c, 10_000, 0.001 / 4) for c in counts])
    lower, upper = stats.simultaneous_bounds(counts, 0.001, "bonferroni")
    np.testing.assert_allclose(lower, [stats.clopper_pearson_lower(c, 10_000, 0.001 / 8) for c in counts])
    np.testing.assert_allclose(upper, [stats.clopper_pearson_upper(c, 10_000, 0.001 / 8) for c in counts])
    with pytest.raises(ValueError, match="method"):
        stats.simultaneous_bounds(counts, 0.001, "sison-glaz")


def test_bonferroni_bounds_cover_every_class_at_once():
    # 4000 multinomial samples; the joint miss rate must stay below alpha (binomial tolerance, false alarm < 1e-6).
    rng = np.random.default_rng(0)
    p, n, alpha, trials = np.array([0.6, 0.25, 0.1, 0.05]), 200, 0.1, 4000
    misses = 0
    for counts in rng.multinomial(n, p, size=trials):
        lower, upper = stats.simultaneous_bounds(counts, alpha, "bonferroni")
        misses += bool(np.any(lower > p) or np.any(upper < p))
    assert misses <= sps.binom.ppf(1 - 1e-6, trials, alpha)


@pytest.mark.parametrize(("k", "n"), [(0, 0), (0, 1), (1, 1), (0, 10), (10, 10), (3, 10), (50, 100), (61, 100)])
def test_binomial_test_is_the_exact_two_sided_test(k, n):
    pvalue = stats.binomial_test_pvalue(k, n, 0.5)
    if n == 0:
        assert pvalue == 1.0
        return
    # at p = 1/2 the distribution is symmetric: twice the smaller tail, capped at 1
    expected = min(1.0, 2 * min(sps.binom.cdf(k, n, 0.5), sps.binom.sf(k - 1, n, 0.5)))
    assert pvalue == pytest.approx(expected, rel=1e-9)


def test_theorem6_bound_is_the_papers_formula():
    y, m, alpha, rho = 300, 500, 0.001, 0.001
    log_term = math.log(1 / rho)
    paper = (y / m - alpha - math.sqrt(2 * alpha * (1 - alpha) * log_term / m) - log_term / (3 * m)) / (1 - alpha)
    analyze_py = y / m - alpha - math.sqrt(alpha * (1 - alpha) * log_term / m) - log_term / (3 * m)
    bound = stats.certified_accuracy_lower_bound(y, m, alpha, rho)
    assert bound == pytest.approx(paper, rel=1e-12)
    assert bound != pytest.approx(analyze_py, rel=1e-6)
    assert 0 < bound < y / m


def test_theorem6_bound_is_never_negative_and_checks_its_inputs():
    assert stats.certified_accuracy_lower_bound(0, 10, 0.01, 0.01) == 0.0
    assert stats.certified_accuracy_lower_bound(7, 10, 0.0, 0.01) == 0.7  # deterministic certificates
    with pytest.raises(ValueError, match="certified correct"):
        stats.certified_accuracy_lower_bound(11, 10, 0.01, 0.01)
    with pytest.raises(ValueError, match="rho"):
        stats.certified_accuracy_lower_bound(5, 10, 0.01, 1.0)
