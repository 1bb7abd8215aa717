"""Kumar & Goldstein: center smoothing, certified outputs in a metric space.

For a function f with outputs in a space with distance d (relaxed-triangle constant K), Gaussian noise
N(0, sigma^2 I) and an input radius eps_in: with probability >= 1 - alpha1 - alpha2 - (1/2 - delta)^k
(k candidate centres; the last term is 0 to machine precision for the exact search), the smoothed output
f^(x) (a centre found from samples) satisfies d(f^(x), f^(x')) <= eps_out = K (1 + 2K) R for every
||x' - x||_2 <= eps_in, where R is the ceil(q m)-th smallest of m fresh centre-to-sample distances and
q = Phi(Phi^-1(1/2 + delta) + eps_in / sigma) + sqrt(ln(1/alpha2) / (2 m)).

Three stages on fresh draws:
1. centre: among n samples, the one with the smallest median distance to all n (`centers="exact"`,
   blockwise on the device), or among `centers` separate candidate samples (the high-dimensional variant);
   its median distance is r. The bound on r needs one candidate inside a ball holding 1/2 + delta of the
   output mass, which all k miss with probability <= (1/2 - delta)^k; that term is part of the row's
   failure probability (`alpha`), and `centers=k` is refused unless it is at most CANDIDATE_MISS_LIMIT;
2. check: on n fresh samples, p = the fraction within r of the centre; abstain unless
   max(Delta1, 1/2 - (p - Delta1)) <= delta, Delta1 = sqrt(ln(2/alpha1) / (2n));
3. certificate: the order statistic above, over m fresh distances streamed from the engine (the m
   outputs are never held at once). These m draws are the estimation stream at sigma, independent of
   stages 1 and 2; the same forward passes give the model's votes, so Cohen and TopK at the same sigma
   (and the sequential modes' looks) take their estimation counts from them. Each certificate keeps its
   own guarantee, as it rests on draws independent of its own other stages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from scipy.stats import norm

from pipeline.certifiers.base import (
    CENTER_CANDIDATES,
    CENTER_CHECK,
    CENTER_SEARCH,
    ESTIMATION,
    Certificate,
    Certifier,
    Cost,
    GaussianNoise,
)
from pipeline.distances import METRICS, get_metric
from pipeline.models import WithFeatures
from pipeline.sampling import Session

OUTPUTS = ("logits", "probs", "features", "denoised")
ROW_BLOCK = 256  # centre rows per block of the exact median-distance search
CANDIDATE_MISS_LIMIT = 1e-6  # the largest (1/2 - delta)^k accepted for k candidate centres

__all__ = ["CANDIDATE_MISS_LIMIT", "OUTPUTS", "Center", "candidate_miss", "check_passes", "max_eps_in",
           "order_statistic", "output_head"]


def candidate_miss(candidates: int, delta: float) -> float:
    """(1/2 - delta)^k: the largest probability that none of k independent candidate centres lands in a
    ball holding 1/2 + delta of the output mass."""
    return (0.5 - delta) ** candidates


def fewest_candidates(delta: float, limit: float = CANDIDATE_MISS_LIMIT) -> int:
    """The smallest k with (1/2 - delta)^k <= limit."""
    return math.ceil(math.log(limit) / math.log(0.5 - delta) - 1e-9)


def max_eps_in(sigma: float, m: int, delta: float, alpha2: float) -> float:
    """The largest certifiable eps_in: sigma (Phi^-1(1 - sqrt(ln(1/alpha2) / (2m))) - Phi^-1(1/2 + delta));
    not positive when m is too small for alpha2 and delta."""
    margin = math.sqrt(math.log(1 / alpha2) / (2 * m))
    if margin >= 0.5 - delta:
        return 0.0
    return float(sigma * (norm.ppf(1 - margin) - norm.ppf(0.5 + delta)))


def quantile_level(sigma: float, eps_in: float, m: int, delta: float, alpha2: float) -> float:
    return float(norm.cdf(norm.ppf(0.5 + delta) + eps_in / sigma) + math.sqrt(math.log(1 / alpha2) / (2 * m)))


def order_statistic(distances: torch.Tensor, level: float) -> float:
    """The ceil(level * m)-th smallest of m distances: the conservative empirical `level`-quantile. A level
    within rounding of 1 (eps_in at the largest certifiable radius, where q = 1 exactly) is the largest."""
    values = distances.flatten().double().cpu()
    if not 0 < level <= 1 + 1e-9:
        raise ValueError(f"center: the quantile level must lie in (0, 1], got {level!r}")
    rank = min(math.ceil(level * len(values)), len(values))
    return float(torch.kthvalue(values, rank).values)


def check_passes(fraction_within: float, n: int, alpha1: float, delta: float) -> bool:
    """The abstain check: accept the centre iff max(Delta1, 1/2 - (p - Delta1)) <= delta."""
    margin = math.sqrt(math.log(2 / alpha1) / (2 * n))
    return max(margin, 0.5 - (fraction_within - margin)) <= delta


def output_head(model: torch.nn.Module, output: str, with_logits: bool = False):
    """The function of a noisy input whose output is smoothed. `with_logits`: a function that returns (the
    model's logits, that output) from one forward pass (all outputs but `denoised`)."""
    if output == "features":
        adapter = WithFeatures(model)
        return adapter if with_logits else lambda inputs: adapter(inputs)[1]
    if output in ("logits", "probs"):
        def head(inputs):
            logits = model(inputs)
            value = logits if output == "logits" else torch.softmax(logits.float(), dim=1)
            return (logits, value) if with_logits else value

        return head
    if output == "denoised":
        if not hasattr(model, "denoiser") or with_logits:
            raise ValueError("center: output='denoised' needs a classifier composed with a denoiser "
                             "(a model with a `denoiser` module)")
        return model.denoiser
    raise ValueError(f"center: output must be one of {OUTPUTS}, got {output!r}")


@dataclass(frozen=True, kw_only=True)
class Center(GaussianNoise, Certifier):
    """Center smoothing of the model's `output` under `metric`, certified for ||delta||_2 <= eps_in; `gaussian`
    picks the input noise (`GaussianNoise`: sound on the 1/255 grid, or real)."""

    name: ClassVar[str] = "center"
    classifies: ClassVar[bool] = False
    own_head: ClassVar[bool] = True

    alpha: float = 0.01  # always alpha1 + alpha2: set those
    eps_in: float
    output: str = "features"
    metric: str = "l2"
    n: int = 10_000
    m: int = 1_000_000
    delta: float = 0.05
    alpha1: float = 0.005
    alpha2: float = 0.005
    centers: str | int = "exact"

    def __post_init__(self) -> None:
        if self.alpha not in (0.01, self.alpha1 + self.alpha2):
            raise ValueError(f"{self.name}: alpha is alpha1 + alpha2 ({self.alpha1 + self.alpha2}); set alpha1 and "
                             f"alpha2 instead of alpha={self.alpha!r}")
        object.__setattr__(self, "alpha", self.alpha1 + self.alpha2)
        super().__post_init__()
        self._check_gaussian()
        self._require_count("n", 1)
        self._require_count("m", 1)
        self._require_choice("output", OUTPUTS)
        if self.metric not in METRICS:
            raise ValueError(f"{self.name}: metric must be one of {sorted(METRICS)}, got {self.metric!r}")
        if not (self.centers == "exact" or (isinstance(self.centers, int) and not isinstance(self.centers, bool)
                                            and self.centers >= 1)):
            raise ValueError(f"{self.name}: centers must be 'exact' or a number of candidates >= 1, "
                             f"got {self.centers!r}")
        if self.centers != "exact" and candidate_miss(self.centers, self.delta) > CANDIDATE_MISS_LIMIT:
            raise ValueError(
                f"{self.name}: centers={self.centers} candidates all miss the half-mass ball with probability up to "
                f"(1/2 - delta)^{self.centers} = {candidate_miss(self.centers, self.delta):.2g}, beyond "
                f"{CANDIDATE_MISS_LIMIT:g}; use centers >= {fewest_candidates(self.delta)} at delta={self.delta} "
                f"(or centers: exact)")
        for field in ("alpha1", "alpha2"):
            if not 0 < getattr(self, field) < 1:
                raise ValueError(f"{self.name}: {field} must lie in (0, 1), got {getattr(self, field)!r}")
        if not 0 < self.delta < 0.5:
            raise ValueError(f"{self.name}: delta must lie in (0, 1/2), got {self.delta!r}")
        if not (isinstance(self.eps_in, int | float) and self.eps_in >= 0):
            raise ValueError(f"{self.name}: eps_in must be a number >= 0, got {self.eps_in!r}")
        largest = max_eps_in(self.sigma, self.m, self.delta, self.alpha2)
        if largest <= 0:
            raise ValueError(f"{self.name}: m={self.m} is too small for alpha2={self.alpha2} and delta={self.delta}: "
                             f"sqrt(ln(1/alpha2)/(2m)) must stay below 1/2 - delta")
        if self.eps_in > largest:
            raise ValueError(f"{self.name}: eps_in={self.eps_in} is beyond the largest certifiable radius "
                             f"{largest:.4g} for sigma={self.sigma}, m={self.m}, delta={self.delta}, "
                             f"alpha2={self.alpha2}")

    @property
    def failure_probability(self) -> float:
        """alpha1 + alpha2 + (1/2 - delta)^k (k: the candidate centres; all n samples in the exact search)."""
        return self.alpha + self.candidate_miss

    @property
    def candidate_miss(self) -> float:
        return candidate_miss(self.n if self.centers == "exact" else self.centers, self.delta)

    @property
    def self_sampling(self) -> bool:
        return True

    @property
    def feeds_counts(self) -> bool:
        """The certification stage's forward passes also give the model's votes (not for `denoised`)."""
        return self.output != "denoised"

    @property
    def cost(self) -> Cost:
        """n: the m certification draws; n0: the centre search (and candidates), the check, the clean pass."""
        return Cost(n=self.m, n0=(0 if self.centers == "exact" else self.centers) + 2 * self.n + 1)

    def params(self, input_shape: tuple | None = None) -> dict:
        distance = get_metric(self.metric)
        return {**super().params(), "max_eps_in": max_eps_in(self.sigma, self.m, self.delta, self.alpha2),
                "quantile": quantile_level(self.sigma, self.eps_in, self.m, self.delta, self.alpha2),
                "candidate_miss": self.candidate_miss, "failure_probability": self.failure_probability,
                "triangle_constant": distance.triangle_constant, "radius_coefficient": distance.radius_coefficient}

    def smooth(self, session: Session, images: torch.Tensor, image_ids: list[str], seed: int,
               head) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stages 1 and 2 (Kumar & Goldstein's "Smooth"): per image the centre output, its median
        distance r, and the fraction of n fresh samples within r of it."""
        distance = get_metric(self.metric)
        centres, radii = self._centres(session, images, image_ids, seed, head, distance)
        within = torch.zeros(len(images), dtype=torch.int64, device=session.engine.device)

        def count_within(outputs, image, draw):
            within.index_add_(0, image, (distance.paired(outputs, centres[image]) <= radii[image]).long())

        session.outputs(images, image_ids, seed, self.noise_draws(CENTER_CHECK, self.n), head, count_within)
        return centres, radii, within.double() / self.n

    def run(self, session: Session, images: torch.Tensor, image_ids: list[str], seed: int,
            labels: list[int | None] | None = None) -> list[Certificate]:
        """The three stages for every image, each batched across the images through the session; the clean
        pass is in every certificate's cost (`cost`)."""
        engine = session.engine
        distance = get_metric(self.metric)
        head = output_head(engine.model, self.output)
        clean = engine.forward(head, images.to(engine.device, torch.float32))
        centres, _, fractions = self.smooth(session, images, image_ids, seed, head)

        level = quantile_level(self.sigma, self.eps_in, self.m, self.delta, self.alpha2)
        distances = torch.empty((len(images), self.m), device=engine.device)

        def keep_distances(outputs, image, draw):
            distances[image, draw] = distance.paired(outputs, centres[image]).float()

        # the m certification draws are the estimation stream at sigma: one forward pass gives this stage its
        # outputs and the model's votes, which answer Cohen's and TopK's estimation draws at the same sigma
        voting = self.feeds_counts and not engine.compile
        session.outputs(images, image_ids, seed, self.noise_draws(ESTIMATION, self.m),
                        output_head(engine.model, self.output, with_logits=True) if voting else head, keep_distances,
                        votes=voting)

        certificates = []
        errors = distance.paired(clean.float(), centres).tolist()
        for index, fraction in enumerate(fractions.tolist()):
            extra = {"eps_in": float(self.eps_in), "metric": self.metric, "output": self.output,
                     "smoothing_error": errors[index]}
            if not check_passes(fraction, self.n, self.alpha1, self.delta):
                certificates.append(Certificate(prediction=None, radius=0.0, cost=self.cost, abstained=True, extra={
                    **extra, "abstain_reason": f"check failed: {fraction:.4f} of {self.n} fresh samples within "
                                               f"the centre's median distance"}))
                continue
            eps_out = distance.radius_coefficient * order_statistic(distances[index], level)
            certificates.append(Certificate(prediction=None, radius=float(self.eps_in), cost=self.cost,
                                            abstained=False, extra={**extra, "eps_out": eps_out}))
        return certificates

    def _centres(self, session, images, image_ids, seed, head, distance) -> tuple[torch.Tensor, torch.Tensor]:
        """(centre output, its median distance) per image."""
        engine = session.engine
        sample = engine.forward(head, images[:1].to(engine.device, torch.float32))  # the output's shape
        shape = tuple(sample.shape[1:])
        candidates_count = self.n if self.centers == "exact" else self.centers
        candidates = torch.empty((len(images), candidates_count, *shape), device=engine.device)

        def keep(outputs, image, draw):
            candidates[image, draw] = outputs.float()

        stage = CENTER_SEARCH if self.centers == "exact" else CENTER_CANDIDATES
        session.outputs(images, image_ids, seed, self.noise_draws(stage, candidates_count), head, keep)
        if self.centers == "exact":
            medians = torch.stack([median_distances(distance, candidates[i], candidates[i])
                                   for i in range(len(images))])
        else:
            to_samples = torch.empty((len(images), candidates_count, self.n), device=engine.device)

            def measure(outputs, image, draw):
                rows = len(outputs)
                paired = distance.paired(candidates[image].flatten(0, 1),
                                         outputs[:, None].expand(rows, candidates_count, *shape).flatten(0, 1))
                to_samples[image, :, draw] = paired.view(rows, candidates_count).float()

            session.outputs(images, image_ids, seed, self.noise_draws(CENTER_SEARCH, self.n), head, measure)
            medians = to_samples.median(dim=2).values
        best = medians.argmin(dim=1)
        index = torch.arange(len(images), device=engine.device)
        return candidates[index, best], medians[index, best]


def median_distances(distance, centres: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """The (lower) median distance from each candidate centre to all samples, ROW_BLOCK centres at a time,
    so the n x n distance matrix is never held at once."""
    return torch.cat([distance.pairwise(centres[i:i + ROW_BLOCK], samples).median(dim=1).values
                      for i in range(0, len(centres), ROW_BLOCK)])
