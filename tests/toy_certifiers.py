"""Three toy certifiers, one of each kind a newcomer may add, defined here and nowhere else: the "next
certifier" walkthrough of ARCHITECTURE.md, kept true by `tests/test_toy_certifiers.py`.

- `ToyLaplace`: a new noise. Counting, l1, on Laplace noise (`Laplace`, registered here as the noise kind
  "laplace"): Teng et al. (2020), with probability >= 1 - alpha the smoothed prediction is the top class
  for every ||delta||_1 < R = -b ln(2 (1 - p_lower)), b = sigma / sqrt(2) the Laplace scale (std sigma).
- `ToyLinf`: a new norm. Counting, Gaussian noise, certified in l_inf: the l_inf ball of radius
  R_2 / sqrt(dimension) lies inside Cohen's l2 ball of radius R_2.
- `ToyLipschitz`: an output certifier. The Gaussian-smoothed probability vector g(x) = E softmax f(x + eps)
  has every coordinate sqrt(2 / pi) / sigma-Lipschitz in l2 (Salman et al. 2019, Lemma 1), so
  ||g(x) - g(x')||_inf <= eps_out = sqrt(2 / pi) eps_in / sigma for every ||x' - x||_2 <= eps_in, with
  certainty and without sampling.

Each declares only what the base class asks of it (name, norm, `draws`/`certify` or `run`, and a
`max_radius` where the default does not apply); the report, compare and nightly read its rows as they are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from scipy.stats import norm

from pipeline import stats
from pipeline.certifiers.base import ABSTAIN, ESTIMATION, SELECTION, Certificate, Certifier, Cost
from pipeline.engine import Draws
from pipeline.noise import NoiseStream, register_noise


class Laplace(NoiseStream):
    """x + b * eps, eps standard Laplace (b = sigma / sqrt(2): standard deviation sigma), by inverse CDF."""

    seed_prefix = "laplace/"

    def __init__(self, shape, device="cpu", *, sigma: float):
        super().__init__(shape, device)
        self.scale = float(sigma) / math.sqrt(2)

    def fill(self, out, seed, image_id, stage, block):
        torch.rand(out.shape, generator=self._seeded(seed, image_id, stage, block), out=out)
        out.sub_(0.5)
        out.copy_(-torch.sign(out) * torch.log1p(-2 * out.abs().clamp_max(0.5 - 2**-25)))  # finite at u = 0

    def apply(self, image, rows, out=None):
        torch.add(image, rows, alpha=self.scale, out=rows if out is None else out)


register_noise("laplace", Laplace)


def _top_class_bound(counts: Mapping[str, np.ndarray], alpha: float) -> tuple[int, int, int, float, Cost]:
    """CERTIFY's first steps: the top class of the selection draws, its estimation count, the draws and the
    one-sided Clopper–Pearson lower bound on its probability."""
    selection, estimation = counts[SELECTION], counts[ESTIMATION]
    top = int(np.argmax(selection))
    count, n = int(estimation[top]), int(estimation.sum())
    return top, count, n, float(stats.clopper_pearson_lower(count, n, alpha)), Cost(n=n, n0=selection.sum())


@dataclass(frozen=True, kw_only=True)
class ToyLaplace(Certifier):
    """Laplace smoothing, certified in l1 (see the module docstring)."""

    name: ClassVar[str] = "toy_laplace"
    norm: ClassVar[str] = "l1"

    n0: int = 64
    n: int = 1000

    def draws(self, labeled: bool) -> dict[str, Draws]:
        return {SELECTION: Draws(SELECTION, self.sigma, self.n0, noise="laplace"),
                ESTIMATION: Draws(ESTIMATION, self.sigma, self.n, noise="laplace")}

    def certify(self, counts: Mapping[str, np.ndarray], label: int | None) -> Certificate:
        top, count, _, p_lower, cost = _top_class_bound(counts, self.alpha)
        if p_lower > 0.5:
            radius = -self.sigma / math.sqrt(2) * math.log(2 * (1 - p_lower))
            return Certificate(prediction=top, radius=radius, cost=cost, p_lower=p_lower, count=count,
                               topk_labels=[top])
        return Certificate(prediction=ABSTAIN, radius=0.0, cost=cost, p_lower=p_lower, count=count)


@dataclass(frozen=True, kw_only=True)
class ToyLinf(Certifier):
    """Cohen's CERTIFY read as an l_inf certificate for inputs of `dimension` coordinates."""

    name: ClassVar[str] = "toy_linf"
    norm: ClassVar[str] = "linf"

    dimension: int = 3 * 32 * 32
    n0: int = 64
    n: int = 1000

    def draws(self, labeled: bool) -> dict[str, Draws]:
        return {SELECTION: Draws(SELECTION, self.sigma, self.n0), ESTIMATION: Draws(ESTIMATION, self.sigma, self.n)}

    def certify(self, counts: Mapping[str, np.ndarray], label: int | None) -> Certificate:
        top, count, _, p_lower, cost = _top_class_bound(counts, self.alpha)
        if p_lower > 0.5:
            radius = self.sigma * float(norm.ppf(p_lower)) / math.sqrt(self.dimension)
            return Certificate(prediction=top, radius=radius, cost=cost, p_lower=p_lower, count=count,
                               topk_labels=[top])
        return Certificate(prediction=ABSTAIN, radius=0.0, cost=cost, p_lower=p_lower, count=count)


@dataclass(frozen=True, kw_only=True)
class ToyLipschitz(Certifier):
    """The Lipschitz bound on Gaussian-smoothed probabilities: an output certificate (see the module
    docstring); deterministic, it samples nothing."""

    name: ClassVar[str] = "toy_lipschitz"
    classifies: ClassVar[bool] = False
    deterministic: ClassVar[bool] = True

    alpha: float = 0.0
    eps_in: float = 0.25

    @property
    def self_sampling(self) -> bool:
        return True

    def run(self, session, images, image_ids: list[str], seed: int,
            labels: list[int | None] | None = None) -> list[Certificate]:
        eps_out = math.sqrt(2 / math.pi) * self.eps_in / self.sigma
        return [Certificate(prediction=None, radius=float(self.eps_in), cost=Cost(0), abstained=False,
                            extra={"eps_in": float(self.eps_in), "eps_out": eps_out, "metric": "linf",
                                   "output": "probs"})
                for _ in image_ids]


TOYS = (ToyLaplace, ToyLinf, ToyLipschitz)
