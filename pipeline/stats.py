"""Confidence bounds and tests behind every certificate. numpy and scipy only.

Each bound here is exact (Clopper–Pearson inverts the binomial distribution itself), one-sided unless
its name says otherwise, and vectorised over counts. Conventions follow the papers: `alpha` is the
probability that a bound fails, `k` successes out of `n` trials.

The sequential bounds (`sequential_bounds`) hold at every look at once, so a procedure may stop when
the data say so. Two constructions: the beta-binomial mixture martingale (Robbins), valid at any
stopping time, and Clopper–Pearson at a fixed schedule of looks with alpha split across the looks.
Peeking at a fixed-n Clopper–Pearson bound after every batch is not valid; these are.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats
from scipy.special import betaln, xlog1py, xlogy

__all__ = [
    "binomial_test_pvalue",
    "certified_accuracy_lower_bound",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "geometric_looks",
    "look_alpha",
    "mixture_bounds",
    "mixture_log_martingale",
    "sequential_bounds",
    "simultaneous_bounds",
]

SEQUENTIAL_TESTS = ("mixture", "looks")


def _check_alpha(alpha: float, name: str = "alpha") -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"{name} must lie in (0, 1), got {alpha!r}")


def _check_counts(k, n) -> tuple[np.ndarray, np.ndarray]:
    k, n = np.asarray(k), np.asarray(n)
    if np.any(n < 1):
        raise ValueError(f"n must be at least 1, got {n!r}")
    if np.any(k < 0) or np.any(k > n):
        raise ValueError(f"counts must lie in [0, n], got k={k!r}, n={n!r}")
    return k, n


def clopper_pearson_lower(k, n, alpha: float):
    """One-sided (1 - alpha) Clopper–Pearson lower bound on a binomial proportion.

    P(p >= bound) >= 1 - alpha for every true p. Equals Beta(alpha; k, n - k + 1), and 0 when k = 0.
    """
    _check_alpha(alpha)
    k, n = _check_counts(k, n)
    bound = stats.beta.ppf(alpha, np.maximum(k, 1), n - k + 1)
    return np.where(k == 0, 0.0, bound)[()]


def clopper_pearson_upper(k, n, alpha: float):
    """One-sided (1 - alpha) Clopper–Pearson upper bound on a binomial proportion.

    P(p <= bound) >= 1 - alpha for every true p. Equals Beta(1 - alpha; k + 1, n - k), and 1 when k = n.
    """
    _check_alpha(alpha)
    k, n = _check_counts(k, n)
    bound = stats.beta.ppf(1.0 - alpha, k + 1, np.maximum(n - k, 1))
    return np.where(k == n, 1.0, bound)[()]


def simultaneous_bounds(counts, alpha: float, method: str = "simuem") -> tuple[np.ndarray, np.ndarray]:
    """Per-class lower and upper bounds on the class probabilities of one multinomial sample.

    `counts` holds c class counts from n = sum(counts) draws. Returns (lower, upper), each of length c.

    - ``"simuem"`` (Jia et al. 2020): every one-sided bound at level alpha / c. For any label l fixed
      before sampling, lower[l] and upper[i] for all i != l hold together with probability >= 1 - alpha
      (c one-sided events, Bonferroni). This is what top-k certification of a given label needs.
    - ``"bonferroni"``: every one of the 2c one-sided bounds at level alpha / (2c), so all lower and all
      upper bounds hold together with probability >= 1 - alpha, whichever labels are used afterwards.
    """
    _check_alpha(alpha)
    counts = np.asarray(counts)
    if counts.ndim != 1 or counts.size < 2:
        raise ValueError(f"counts must be a vector of at least 2 class counts, got shape {counts.shape}")
    if method == "simuem":
        level = alpha / counts.size
    elif method == "bonferroni":
        level = alpha / (2 * counts.size)
    else:
        raise ValueError(f"method must be 'simuem' or 'bonferroni', got {method!r}")
    n = int(counts.sum())
    return (
        np.asarray(clopper_pearson_lower(counts, n, level), dtype=float),
        np.asarray(clopper_pearson_upper(counts, n, level), dtype=float),
    )


def binomial_test_pvalue(k: int, n: int, p: float = 0.5) -> float:
    """Two-sided exact binomial test of H0: success probability = p (``scipy.stats.binomtest``).

    With n = 0 there is no evidence either way and the p-value is 1.
    """
    if n == 0:
        return 1.0
    return float(stats.binomtest(int(k), int(n), p).pvalue)


def certified_accuracy_lower_bound(num_certified_correct: int, num_examples: int, alpha: float, rho: float) -> float:
    """High-probability lower bound on the true certified accuracy (Cohen et al. 2019, Theorem 6).

    If each certificate fails with probability at most alpha, then with probability >= 1 - rho over the
    certification randomness the true certified accuracy is at least

        1/(1 - alpha) * (Y/m - alpha - sqrt(2 alpha (1 - alpha) ln(1/rho) / m) - ln(1/rho) / (3 m)),

    where Y of the m examples were certified correctly at the radius of interest. This is the paper's
    form; the factor 2 and the 1/(1 - alpha) are not dropped. A negative bound is reported as 0.
    alpha = 0 (a deterministic certifier such as DSSN) makes Y/m exact: it is returned as it is.
    """
    _check_alpha(rho, "rho")
    m = int(num_examples)
    if m < 1 or not 0 <= num_certified_correct <= m:
        raise ValueError(f"need 0 <= certified correct <= examples and examples >= 1, got "
                         f"{num_certified_correct} of {num_examples}")
    if alpha == 0:
        return num_certified_correct / m
    _check_alpha(alpha)
    log_term = math.log(1.0 / rho)
    bound = (num_certified_correct / m - alpha - math.sqrt(2.0 * alpha * (1.0 - alpha) * log_term / m)
             - log_term / (3.0 * m)) / (1.0 - alpha)
    return max(0.0, bound)


def mixture_log_martingale(k, n, p, a: float = 1.0, b: float = 1.0):
    """log M_n(p) of the beta-binomial mixture martingale after k successes in n draws.

    M_n(p) = B(a + k, b + n - k) / (B(a, b) p^k (1 - p)^(n - k)): the Beta(a, b)-mixture likelihood over
    the likelihood at p. Under a true mean p it is a non-negative martingale with mean one, so by Ville's
    inequality P(exists n: M_n(p) >= 1/alpha) <= alpha.
    """
    k, n, p = np.asarray(k, dtype=float), np.asarray(n, dtype=float), np.asarray(p, dtype=float)
    return betaln(a + k, b + n - k) - betaln(a, b) - xlogy(k, p) - xlog1py(n - k, -p)


def mixture_bounds(k, n, alpha: float, a: float = 1.0, b: float = 1.0, iterations: int = 52):
    """Anytime-valid (lower, upper) bounds on a Bernoulli mean: the confidence sequence
    {m : M_n(m) < 1/alpha} of the beta-binomial mixture, one-sided at level alpha on each side.

    P(exists n: p < lower_n) <= alpha and P(exists n: p > upper_n) <= alpha, whatever rule decides when to
    stop. M_n(m) falls on (0, k/n] and rises on [k/n, 1), and M_n(k/n) <= 1, so each side has one root; it
    is found by bisection and the end outside the confidence sequence's interior is returned (the lower
    bound from below, the upper from above). lower = 0 when k = 0, upper = 1 when k = n.
    """
    _check_alpha(alpha)
    k, n = _check_counts(k, n)
    k, n = np.broadcast_arrays(k.astype(float), n.astype(float))
    level = math.log(1.0 / alpha)
    mean = k / n

    def above(m):  # True where m is outside the sequence (the martingale has reached 1/alpha)
        return mixture_log_martingale(k, n, m, a, b) >= level

    low, high = np.zeros_like(mean), mean.copy()  # lower root in (0, k/n]
    top_low, top_high = mean.copy(), np.ones_like(mean)  # upper root in [k/n, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(iterations):
            middle = (low + high) / 2
            out = above(middle)
            low, high = np.where(out, middle, low), np.where(out, high, middle)
            middle = (top_low + top_high) / 2
            out = above(middle)
            top_low, top_high = np.where(out, top_low, middle), np.where(out, middle, top_high)
    lower = np.where(k == 0, 0.0, low)
    upper = np.where(k == n, 1.0, top_high)
    return lower[()], upper[()]


def geometric_looks(first: int, ratio: float, budget: int) -> list[int]:
    """The draw counts at which a sequential test looks: first, then each look times `ratio` (rounded up,
    at least one more draw), up to and including `budget`. Fixed before sampling, as the looks test needs."""
    if not (isinstance(first, int) and first >= 1 and isinstance(budget, int) and budget >= first):
        raise ValueError(f"looks need integers 1 <= first <= budget, got first={first!r}, budget={budget!r}")
    if not ratio > 1:
        raise ValueError(f"the look ratio must be > 1, got {ratio!r}")
    looks = [first]
    while looks[-1] < budget:
        looks.append(min(budget, max(looks[-1] + 1, math.ceil(looks[-1] * ratio))))
    return looks


def look_alpha(look: int, alpha: float) -> float:
    """The level of look j = 1, 2, ...: 5 alpha / ((j + 4)(j + 5)). These sum to alpha over all j >= 1, so
    an open-ended schedule of looks keeps the overall failure probability at alpha."""
    if look < 1:
        raise ValueError(f"looks are numbered from 1, got {look!r}")
    return 5.0 * alpha / ((look + 4) * (look + 5))


def sequential_bounds(k, n, look: int, alpha: float, test: str = "mixture"):
    """(lower, upper) bounds on a Bernoulli mean at look `look` (1, 2, ...) after k successes in n draws,
    valid simultaneously over all looks: each side fails at some look with probability at most alpha.

    - ``"mixture"``: `mixture_bounds`, valid at any stopping time (the look number is not used).
    - ``"looks"``: one-sided Clopper–Pearson at level `look_alpha(look, alpha)`; valid when n at look j is
      fixed before sampling (see `geometric_looks`), by the union bound over looks.
    """
    if test == "mixture":
        return mixture_bounds(k, n, alpha)
    if test == "looks":
        level = look_alpha(look, alpha)
        return clopper_pearson_lower(k, n, level), clopper_pearson_upper(k, n, level)
    raise ValueError(f"test must be one of {SEQUENTIAL_TESTS}, got {test!r}")
