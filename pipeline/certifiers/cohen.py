"""Cohen, Rosenfeld & Kolter (2019): CERTIFY and PREDICT for Gaussian smoothing in the l2 norm.

g(x) = argmax_c P(f(x + eps) = c), eps ~ N(0, sigma^2 I). With probability >= 1 - alpha over the
sampling, a certificate (c_A, R) that is not an abstention means g(x + delta) = c_A for every
||delta||_2 < R, R = sigma * Phi^-1(p_lower) (Theorem 1 with p_B = 1 - p_A). PREDICT returns g(x) or
abstains, wrong with probability at most alpha (Hung & Fithian's test).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from scipy.special import ndtr
from scipy.stats import norm

from pipeline import stats
from pipeline.certifiers.base import ABSTAIN, ESTIMATION, SELECTION, Certificate, Certifier, Cost, GaussianNoise
from pipeline.certifiers.sequential import SEQUENTIAL_MODES, Outcome, SequentialOptions, top_class
from pipeline.engine import Draws

__all__ = ["Cohen", "certificate_from_counts", "certify_from_counts", "max_radius", "predict_from_counts",
           "sequential_certificate"]


def certificate_from_counts(selection_counts, estimation_counts, sigma: float, alpha: float) -> Certificate:
    """CERTIFY on counts: the top class of the selection draws, bounded on the fresh estimation draws.

    p_lower is the one-sided Clopper–Pearson bound at level alpha; the certificate needs p_lower > 1/2
    strictly, otherwise it abstains with radius 0.
    """
    selection_counts = np.asarray(selection_counts)
    estimation_counts = np.asarray(estimation_counts)
    top = int(np.argmax(selection_counts))
    count, n = int(estimation_counts[top]), int(estimation_counts.sum())
    p_lower = float(stats.clopper_pearson_lower(count, n, alpha))
    cost = Cost(n=n, n0=selection_counts.sum())
    if p_lower > 0.5:
        return Certificate(prediction=top, radius=float(sigma * norm.ppf(p_lower)), cost=cost, p_lower=p_lower,
                           count=count, topk_labels=[top])
    return Certificate(prediction=ABSTAIN, radius=0.0, cost=cost, p_lower=p_lower, count=count)


def sequential_certificate(top: int, outcome: Outcome, sigma: float, n0: int, scale: float = 1.0) -> Certificate:
    """The certificate of a sequential run (see `pipeline.certifiers.sequential`) after `n0` selection draws:
    class `top` with the largest radius over the looks, or an abstention when no look certified a radius
    > 0. p_lower is the bound behind the radius; `scale` maps the vote's radius to the input's (1 for Cohen)."""
    count = int(outcome.counts[top])
    p_lower = float(ndtr(outcome.radius / (scale * sigma)))
    cost = Cost(n=outcome.draws, n0=n0)
    if outcome.radius > 0:
        return Certificate(prediction=top, radius=outcome.radius, cost=cost, p_lower=p_lower, count=count,
                           topk_labels=[top], details=outcome.details())
    return Certificate(prediction=ABSTAIN, radius=0.0, cost=cost, p_lower=p_lower, count=count,
                       details=outcome.details(), extra={"abstain_reason": outcome.abstain_reason})


def certify_from_counts(selection_counts, estimation_counts, sigma: float, alpha: float) -> tuple[int, float]:
    """CERTIFY on counts: (predicted class, certified l2 radius), or (-1, 0.0) on abstention."""
    certificate = certificate_from_counts(selection_counts, estimation_counts, sigma, alpha)
    return certificate.prediction, certificate.radius


def max_radius(sigma: float, n: int, alpha: float) -> float:
    """The largest radius CERTIFY can issue with n estimation draws at level alpha:
    sigma * Phi^-1(alpha^(1/n)), reached when all n draws vote for the selected class (alpha^(1/n) is the
    one-sided Clopper–Pearson lower bound for n successes in n). No radius at or above it can be certified."""
    return sigma * norm.ppf(alpha ** (1 / n))


def predict_from_counts(counts, alpha: float) -> int:
    """PREDICT on counts: the top class if the two-sided binomial test of its count against the runner-up's
    rejects equality at level alpha, else -1. Ties between counts go to the lower class index."""
    counts = np.asarray(counts)
    first, second = np.argsort(-counts, kind="stable")[:2]
    count_a, count_b = int(counts[first]), int(counts[second])
    if stats.binomial_test_pvalue(count_a, count_a + count_b, 0.5) <= alpha:
        return int(first)
    return ABSTAIN


@dataclass(frozen=True, kw_only=True)
class Cohen(GaussianNoise, SequentialOptions, Certifier):
    """Cohen et al.'s smoothed classifier: `mode="certify"` (CERTIFY: n0 selection draws, n fresh
    estimation draws) or `mode="predict"` (PREDICT on n draws, no radius); `mode="sequential"` (target
    `radii`) and `mode="max_radius"` stop each image as soon as it is decided, n being the budget (see
    `pipeline.certifiers.sequential`; same guarantee as CERTIFY). A model with a denoiser in front is
    denoised smoothing (Salman et al.), certified the same way. `gaussian` picks the noise (`GaussianNoise`:
    sound on the 1/255 grid, or real)."""

    name: ClassVar[str] = "cohen"

    n0: int = 100
    n: int = 100_000
    mode: str = "certify"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require_count("n0", 1)
        self._require_count("n", 1)
        self._require_choice("mode", ("certify", "predict", *SEQUENTIAL_MODES))
        self._check_sequential()
        self._check_gaussian()

    def max_radius(self, num_classes: int | None = None, details: Mapping | None = None) -> float | None:
        """CERTIFY's radius when all n draws vote for the selected class (`max_radius`); PREDICT certifies
        no radius and the sequential modes have no fixed maximum: None."""
        return super().max_radius(num_classes, details) if self.mode == "certify" else None

    def draws(self, labeled: bool) -> dict[str, Draws]:
        estimation = self.noise_draws(ESTIMATION, self.n)
        if self.mode == "predict":
            return {ESTIMATION: estimation}
        return {SELECTION: self.noise_draws(SELECTION, self.n0), ESTIMATION: estimation}

    def certify(self, counts: Mapping[str, np.ndarray], label: int | None) -> Certificate:
        if self.mode == "predict":
            prediction = predict_from_counts(counts[ESTIMATION], self.alpha)
            return Certificate(prediction=prediction, radius=0.0, cost=Cost(n=counts[ESTIMATION].sum()),
                               topk_labels=None if prediction == ABSTAIN else [prediction])
        return certificate_from_counts(counts[SELECTION], counts[ESTIMATION], self.sigma, self.alpha)

    def run(self, session, images, image_ids: list[str], seed: int,
            labels: list[int | None] | None = None) -> list[Certificate]:
        """The sequential modes: every image's looks through the engine's continuous batching."""

        def procedure():
            top, outcome = yield from top_class(self)
            return sequential_certificate(top, outcome, self.sigma, self.n0)

        return session.sequential(images, image_ids, seed, [procedure() for _ in image_ids])
