"""Jia, Cao, Wang & Gong (2020): certified top-k predictions of Gaussian smoothing in the l2 norm.

For a label l, with probability >= 1 - alpha over the n draws, a radius R > 0 means that l stays
among the k classes of largest smoothed probability for every ||delta||_2 < R (their Theorem 1).
R = max over t = 1..k of the root of

    Phi(Phi^-1(p_lower_l) - R / sigma) = Phi(Phi^-1(p_upper_S_t) + R / sigma) / t,

where S_t holds the t smallest of the k largest upper bounds of the other classes. Each root is found
by bisection from a bracket that is valid for every t (the t = 1 closed form) and doubled until it
contains the root, and the lower end is returned, so the radius is never above the true root and is
within `tolerance` of it. No cap: large sigma gives large radii.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from scipy.special import ndtr, ndtri

from pipeline import stats
from pipeline.certifiers.base import ABSTAIN, ESTIMATION, SELECTION, Certificate, Certifier, Cost, GaussianNoise
from pipeline.certifiers.sequential import SEQUENTIAL_MODES, SequentialOptions
from pipeline.engine import Draws

BOUNDS = ("simuem", "binocp")

__all__ = ["BOUNDS", "TopK", "label_bounds", "predict_from_counts", "radius_from_bounds", "radius_from_counts",
           "sequential_label_bounds"]


def label_bounds(counts, label: int, alpha: float, bound: str = "simuem") -> tuple[float, np.ndarray]:
    """(lower bound on p_label, upper bounds on the other classes), jointly valid with prob. >= 1 - alpha.

    `"simuem"`: Clopper–Pearson bounds at alpha / c for all c classes (Bonferroni). `"binocp"`: one bound
    at alpha on p_label, and 1 - p_lower for every other class. Each upper bound is capped at 1 - p_lower.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if bound == "simuem":
        lower, upper = stats.simultaneous_bounds(counts, alpha, "simuem")
        p_lower = float(lower[label])
    elif bound == "binocp":
        p_lower = float(stats.clopper_pearson_lower(counts[label], counts.sum(), alpha))
        upper = np.full(counts.size, 1.0 - p_lower)
    else:
        raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")
    return p_lower, np.minimum(np.delete(upper, label), 1.0 - p_lower)


def _root(p_lower: float, p_set: float, t: int, sigma: float, tolerance: float) -> float:
    """Largest R (to within tolerance, from below) with Phi(a - R/sigma) >= Phi(b + R/sigma) / t; infinite
    when p_lower is 1 or p_set is 0 (only optimistic bounds reach those)."""
    if p_lower <= p_set / t:
        return 0.0
    if p_lower >= 1.0 or p_set <= 0.0:
        return math.inf
    a, b = ndtri(p_lower), ndtri(p_set)

    def holds(radius: float) -> bool:
        return ndtr(a - radius / sigma) >= ndtr(b + radius / sigma) / t

    low = max(0.0, sigma * (a - b) / 2.0)  # both sides are equal at the t = 1 root, so it holds for every t
    step = sigma
    while holds(low + step):
        low, step = low + step, 2.0 * step
    high = low + step
    while high - low > tolerance:
        middle = (low + high) / 2.0
        if holds(middle):
            low = middle
        else:
            high = middle
    return low


def sequential_label_bounds(counts, label: int, look: int, alpha: float, bound: str = "simuem",
                            test: str = "mixture") -> tuple[float, np.ndarray, float, np.ndarray]:
    """`label_bounds` from anytime-valid bounds (`pipeline.stats.sequential_bounds`), valid at every look at
    once: (lower bound on p_label, upper bounds on the others), and the optimistic pair (upper bound on
    p_label, lower bounds on the others) that can only rule radii out."""
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    if bound == "simuem":
        lower, upper = stats.sequential_bounds(counts, n, look, alpha / counts.size, test)
        lower, upper = np.asarray(lower, dtype=float), np.asarray(upper, dtype=float)
        p_lower, p_upper = float(lower[label]), float(upper[label])
        return (p_lower, np.minimum(np.delete(upper, label), 1.0 - p_lower),
                p_upper, np.minimum(np.delete(lower, label), 1.0 - p_upper))
    if bound == "binocp":
        p_lower, p_upper = (float(b) for b in stats.sequential_bounds(counts[label], n, look, alpha, test))
        return (p_lower, np.full(counts.size - 1, 1.0 - p_lower), p_upper, np.full(counts.size - 1, 1.0 - p_upper))
    raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")


def radius_from_bounds(p_lower: float, upper, k: int, sigma: float, tolerance: float = 1e-5) -> float:
    """The top-k radius from a lower bound on p_label and upper bounds on the other classes; 0.0 if none."""
    largest = np.sort(np.asarray(upper))[-k:]  # the k largest upper bounds, ascending
    set_bounds = np.minimum(np.cumsum(largest), 1.0 - p_lower)
    return max(_root(p_lower, float(set_bounds[t - 1]), t, sigma, tolerance) for t in range(1, k + 1))


def radius_from_counts(counts, label: int, k: int, sigma: float, alpha: float, bound: str = "simuem",
                       tolerance: float = 1e-5) -> float:
    """Certified l2 radius within which `label` stays in the smoothed top k; 0.0 if not certified."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or counts.size < 2:
        raise ValueError(f"counts must be a vector of at least 2 class counts, got shape {counts.shape}")
    if not 1 <= k < counts.size:
        raise ValueError(f"k must lie in [1, number of classes - 1] = [1, {counts.size - 1}], got {k!r}")
    if not 0 <= label < counts.size:
        raise ValueError(f"label must lie in [0, {counts.size - 1}], got {label!r}")
    p_lower, upper = label_bounds(counts, label, alpha, bound)
    return radius_from_bounds(p_lower, upper, k, sigma, tolerance)


def predict_from_counts(counts, k: int, alpha: float) -> list[int] | None:
    """Top-k PREDICT: the k classes of largest count, or None (abstain).

    Consecutive two-sided binomial tests on the top k + 1 counts: the t-th and (t+1)-th largest counts
    must differ at level alpha for every t = 1..k (Hung & Fithian's rank verification, as used by Jia
    et al.). Ties between counts go to the lower class index.
    """
    counts = np.asarray(counts)
    if not 1 <= k < counts.size:
        raise ValueError(f"k must lie in [1, number of classes - 1] = [1, {counts.size - 1}], got {k!r}")
    order = np.argsort(-counts, kind="stable")[: k + 1]
    for t in range(k):
        above, below = int(counts[order[t]]), int(counts[order[t + 1]])
        if stats.binomial_test_pvalue(above, above + below, 0.5) > alpha:
            return None
    return [int(c) for c in order[:k]]


@dataclass(frozen=True, kw_only=True)
class TopK(GaussianNoise, SequentialOptions, Certifier):
    """Jia et al.'s top-k CERTIFY for the true label, on n draws.

    With no labels, the label to certify is the top class of n0 separate selection draws, so it is
    chosen independently of the n estimation draws. `topk_labels` holds top-k PREDICT on the
    estimation draws (its own guarantee at level alpha; not given in the sequential modes, whose
    sample size depends on the data). `mode="sequential"` (target `radii`) and `mode="max_radius"` stop
    each image once decided, n being the budget (see `pipeline.certifiers.sequential`). `gaussian` picks the
    noise (`GaussianNoise`).
    """

    name: ClassVar[str] = "topk"

    k: int = 3
    n: int = 100_000
    n0: int = 100
    bound: str = "simuem"
    tolerance: float = 1e-5
    mode: str = "certify"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require_count("k", 1)
        self._require_count("n", 1)
        self._require_count("n0", 1)
        self._require_choice("bound", BOUNDS)
        self._require_choice("mode", ("certify", *SEQUENTIAL_MODES))
        if not self.tolerance > 0:
            raise ValueError(f"{self.name}: tolerance must be > 0, got {self.tolerance!r}")
        self._check_sequential()
        self._check_gaussian()

    def max_radius(self, num_classes: int | None = None, details: Mapping | None = None) -> float | None:
        """The radius when all n draws vote for the label; its bounds depend on the number of classes, so
        None when that is not known (and in the sequential modes)."""
        return None if num_classes is None else super().max_radius(num_classes, details)

    def check_num_classes(self, num_classes: int) -> None:
        if self.k >= num_classes:
            raise ValueError(f"{self.name}: k must be smaller than the number of classes ({num_classes}), "
                             f"got k={self.k}")

    def draws(self, labeled: bool) -> dict[str, Draws]:
        estimation = self.noise_draws(ESTIMATION, self.n)
        if labeled:
            return {ESTIMATION: estimation}
        return {SELECTION: self.noise_draws(SELECTION, self.n0), ESTIMATION: estimation}

    def certify(self, counts: Mapping[str, np.ndarray], label: int | None) -> Certificate:
        estimation = counts[ESTIMATION]
        selection_draws = 0
        if label is None:
            label = int(np.argmax(counts[SELECTION]))
            selection_draws = counts[SELECTION].sum()
        radius = radius_from_counts(estimation, label, self.k, self.sigma, self.alpha, self.bound, self.tolerance)
        p_lower, _ = label_bounds(estimation, label, self.alpha, self.bound)
        return Certificate(prediction=label if radius > 0 else ABSTAIN, radius=radius,
                           cost=Cost(n=estimation.sum(), n0=selection_draws), p_lower=p_lower,
                           count=int(estimation[label]),
                           topk_labels=predict_from_counts(estimation, self.k, self.alpha))

    def run(self, session, images, image_ids: list[str], seed: int,
            labels: list[int | None] | None = None) -> list[Certificate]:
        """The sequential modes: every image's looks through the engine's continuous batching."""
        labels = [None] * len(image_ids) if labels is None else labels
        unlabeled = any(label is None for label in labels)  # then every image selects, as in `draws`

        def procedure(label: int | None):
            if unlabeled:
                label = int(np.argmax((yield self.noise_draws(SELECTION, self.n0))))

            def radii_at(counts: np.ndarray, look: int) -> tuple[float, float]:
                p_lower, upper, p_upper, lower = sequential_label_bounds(counts, label, look, self.alpha, self.bound,
                                                                         self.test)
                return (radius_from_bounds(p_lower, upper, self.k, self.sigma, self.tolerance),
                        radius_from_bounds(p_upper, lower, self.k, self.sigma, self.tolerance))

            outcome = yield from self.estimate(radii_at)
            p_lower = sequential_label_bounds(outcome.counts, label, outcome.looks, self.alpha, self.bound,
                                              self.test)[0]
            certified = outcome.radius > 0
            return Certificate(prediction=label if certified else ABSTAIN, radius=max(outcome.radius, 0.0),
                               cost=Cost(n=outcome.draws, n0=self.n0 if unlabeled else 0), p_lower=p_lower,
                               count=int(outcome.counts[label]), details=outcome.details(),
                               extra=None if certified else {"abstain_reason": outcome.abstain_reason})

        return session.sequential(images, image_ids, seed, [procedure(label) for label in labels])
