"""Confidence bounds and tests behind every certificate. numpy and scipy only.

Each bound here is exact (Clopper–Pearson inverts the binomial distribution itself), one-sided unless
its name says otherwise, and vectorised over counts. Conventions follow the papers: `alpha` is the
probability that a bound fails, `k` successes out of `n` trials.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

__all__ = [
    "binomial_test_pvalue",
    "certified_accuracy_lower_bound",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "simultaneous_bounds",
]


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
