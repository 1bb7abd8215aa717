"""Levine & Feizi (2021): l1 certificates from splitting noise, deterministic (DSSN) and randomized (SSN).

Splitting noise with half-width lambda = sqrt(3) sigma makes every class probability 1/(2 lambda)-Lipschitz
in the l1 norm, whatever the joint law of the per-coordinate split offsets (see `pipeline.noise`).

- `DSSN`: inputs on the 1/q grid; one shared offset enumerated over all L = int(2 lambda q) positions
  gives the smoothed classifier's vote counts exactly. The prediction A (stable ranking: ties go to the
  smaller class index) provably stays the smoothed prediction for every perturbed input x' on the 1/q
  grid with ||x' - x||_1 <= floor((c_A - c_B - [B < A]) / 2) / q. No sampling, no failure probability,
  never abstains (radius 0 certifies x itself).
- `SSN`: independent offsets, sampled. With probability >= 1 - alpha, a certificate (A, R) means the
  smoothed prediction is A for every x' with ||x' - x||_1 < R = 2 lambda (p_lower - 1/2), p_lower the
  one-sided Clopper–Pearson bound on n fresh draws; abstains unless p_lower > 1/2. Any real x'.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from pipeline import stats
from pipeline.certifiers.base import ABSTAIN, DSSN_OFFSETS, ESTIMATION, SELECTION, Certificate, Certifier, Cost
from pipeline.engine import Draws
from pipeline.noise import dssn_levels, splitting_lambda, splitting_width, template_identity

GRID_TOLERANCE = 1e-3  # in units of one level: float32 images of k/q are within ~1e-5 of the grid

__all__ = ["DSSN", "SSN", "certify_from_counts"]


def certify_from_counts(counts, q: int = 255) -> tuple[int, float]:
    """DSSN on exact vote counts: (prediction, l1 radius) = (A, floor((c_A - c_B - [B < A]) / 2) / q),
    A and B first and second in a stable descending sort of the counts."""
    counts = np.asarray(counts, dtype=np.int64)
    first, second = np.argsort(-counts, kind="stable")[:2]
    steps = (int(counts[first]) - int(counts[second]) - int(second < first)) // 2
    return int(first), steps / q


@dataclass(frozen=True, kw_only=True)
class DSSN(Certifier):
    """Deterministic splitting noise. Threat model: x and every perturbed x' lie on the 1/q grid."""

    name: ClassVar[str] = "dssn"
    norm: ClassVar[str] = "l1"
    deterministic: ClassVar[bool] = True

    alpha: float = 0.0
    q: int = 255
    template: str | int = "reference"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require_count("q", 1)
        seeded = isinstance(self.template, int) and not isinstance(self.template, bool)
        if not (self.template == "reference" or seeded):
            raise ValueError(f"{self.name}: template must be 'reference' or an integer seed, got {self.template!r}")
        if self.levels < 1:
            smallest = 1 / (splitting_width(1.0) * self.q)  # the sigma at which L = int(2 lambda q) reaches 1
            raise ValueError(f"{self.name}: sigma={self.sigma} is too small for q={self.q}: L = int(2 sqrt(3) sigma q) "
                             f"= {self.levels} levels; sigma must be at least {smallest:.4g}")

    @property
    def covers(self) -> str:
        return f"grid 1/{self.q}"

    @property
    def levels(self) -> int:
        return dssn_levels(self.sigma, self.q)

    def check_images(self, images, image_ids) -> None:
        off_grid = (images * self.q - torch.round(images * self.q)).abs().flatten(1).amax(dim=1)
        for image_id, deviation in zip(image_ids, off_grid.tolist(), strict=True):
            if deviation > GRID_TOLERANCE:
                raise ValueError(f"{self.name}: image {image_id} is not on the 1/{self.q} grid (largest deviation "
                                 f"{deviation / self.q:.3g} from a multiple of 1/{self.q}); DSSN certifies "
                                 f"{self.q}-level quantized inputs only")

    def params(self, input_shape: tuple | None = None) -> dict:
        params = {**super().params(), "levels": self.levels, "lambda": splitting_lambda(self.sigma),
                  "threat_model": f"l1 ball; the input and every perturbed input on the 1/{self.q} grid"}
        if input_shape is not None:
            params["template_identity"] = template_identity(math.prod(input_shape), self.levels, self.template)
        return params

    def draws(self, labeled: bool) -> dict[str, Draws]:
        return {ESTIMATION: Draws(DSSN_OFFSETS, self.sigma, self.levels, noise="dssn",
                                  options=(("q", self.q), ("template", self.template)))}

    def certify(self, counts: Mapping[str, np.ndarray], label: int | None) -> Certificate:
        votes = counts[ESTIMATION]
        prediction, radius = certify_from_counts(votes, self.q)
        count = int(votes[prediction])
        return Certificate(prediction=prediction, radius=radius, cost=Cost(n=votes.sum()),
                           p_lower=count / self.levels, count=count, topk_labels=[prediction])


@dataclass(frozen=True, kw_only=True)
class SSN(Certifier):
    """Randomized splitting noise: n0 selection draws pick the class, n fresh draws bound its probability."""

    name: ClassVar[str] = "ssn"
    norm: ClassVar[str] = "l1"

    n0: int = 64
    n: int = 100_000

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require_count("n0", 1)
        self._require_count("n", 1)

    def params(self, input_shape: tuple | None = None) -> dict:
        return {**super().params(), "lambda": splitting_lambda(self.sigma),
                "threat_model": "l1 ball; any real perturbed input"}

    def draws(self, labeled: bool) -> dict[str, Draws]:
        return {SELECTION: Draws(SELECTION, self.sigma, self.n0, noise="ssn"),
                ESTIMATION: Draws(ESTIMATION, self.sigma, self.n, noise="ssn")}

    def certify(self, counts: Mapping[str, np.ndarray], label: int | None) -> Certificate:
        selection, estimation = counts[SELECTION], counts[ESTIMATION]
        top = int(np.argmax(selection))
        count, n = int(estimation[top]), int(estimation.sum())
        p_lower = float(stats.clopper_pearson_lower(count, n, self.alpha))
        cost = Cost(n=n, n0=selection.sum())
        if p_lower > 0.5:
            radius = splitting_width(self.sigma) * (p_lower - 0.5)
            return Certificate(prediction=top, radius=radius, cost=cost, p_lower=p_lower, count=count,
                               topk_labels=[top])
        return Certificate(prediction=ABSTAIN, radius=0.0, cost=cost, p_lower=p_lower, count=count)
