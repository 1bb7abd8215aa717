"""Sequential certification: stop sampling an image as soon as its certificate is decided.

A fixed-N certificate spends N draws on every image, though most images are decided after a few hundred.
Here the estimation draws come in looks n_1 < n_2 < ... <= n (`pipeline.stats.geometric_looks`, rounded up
to whole blocks of 64 draws; fixed before sampling), and at
every look the certifier computes its radius from anytime-valid bounds (`pipeline.stats.sequential_bounds`):
bounds that hold at all looks at once with probability >= 1 - alpha. Two modes:

- `mode="sequential"` with target radii r_1 < ... < r_m (the radii of the certified-accuracy table): a
  target is certified once the radius from the lower bounds exceeds it (for Cohen: the test of
  H0: p_A <= Phi(r / sigma) rejects), and ruled out (futility) once the radius from the upper bounds is at
  most it. The image stops when every target is decided, or at the budget n.
- `mode="max_radius"`: no targets; the image stops when the upper bounds rule out any radius (abstain),
  when sampling on to the budget n would add less than `min_gain` to the radius if the observed
  frequencies held (saturated), or at the budget.

The guarantee. Every lower bound of every look holds with probability >= 1 - alpha simultaneously, and the
radius is a monotone function of the bounds, so the largest radius over the looks (the one reported) is
valid at whatever look the image stops, and so is each certified target: P(some target or the reported
radius is wrong) <= alpha, the same guarantee as fixed-N CERTIFY. Stopping for futility never certifies,
so it costs no alpha; the upper bounds only steer the sampling. The class to certify comes from separate
selection draws, as in CERTIFY (for top-k: the true label, when given).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Generator
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtri

from pipeline import stats
from pipeline.certifiers.base import ESTIMATION, SELECTION
from pipeline.engine import Draws
from pipeline.noise import DRAWS_PER_BLOCK

SEQUENTIAL_MODES = ("sequential", "max_radius")
SEQUENTIAL_FIELDS = ("radii", "test", "first_look", "look_ratio", "min_gain")

__all__ = ["SEQUENTIAL_FIELDS", "SEQUENTIAL_MODES", "Outcome", "SequentialOptions", "block_looks", "top_class"]


@dataclass(frozen=True)
class Outcome:
    """Where a sequential certifier stopped on one image."""

    counts: np.ndarray  # class counts of the estimation draws at the last look
    draws: int  # estimation draws used
    looks: int  # looks taken
    radius: float  # the largest radius from lower bounds over the looks (<= 0: nothing certified)
    optimistic: float  # the smallest radius from upper bounds over the looks
    stopped: str  # "decided", "futility", "saturated" or "budget"
    certified: list[float]  # target radii certified
    ruled_out: list[float]  # target radii ruled out by the upper bounds

    def details(self) -> dict:
        return {"sequential": {"draws": self.draws, "looks": self.looks, "stopped": self.stopped,
                               "certified_radii": self.certified, "ruled_out_radii": self.ruled_out,
                               "optimistic_radius": self.optimistic if math.isfinite(self.optimistic) else None}}

    @property
    def abstain_reason(self) -> str | None:
        """Why no radius was certified: "futility" (the upper bounds ruled it out) or "budget"."""
        if self.radius > 0:
            return None
        return "futility" if self.stopped in ("futility", "decided") else "budget"


def block_looks(first: int, ratio: float, budget: int) -> list[int]:
    """The draw counts of the looks: the geometric schedule, each rounded up to whole blocks of noise draws
    (so a look never splits a block that the next look would generate again), capped at the budget."""
    looks = stats.geometric_looks(first, ratio, budget)
    return sorted({min(budget, -(-n // DRAWS_PER_BLOCK) * DRAWS_PER_BLOCK) for n in looks})


@dataclass(frozen=True, kw_only=True)
class SequentialOptions:
    """Settings of the sequential modes; they apply only with `mode` "sequential" or "max_radius".

    `radii`: target radii (mode sequential). `test`: "mixture" (beta-binomial mixture martingale) or
    "looks" (Clopper–Pearson with alpha split over the looks). Looks at `first_look` draws, then each
    look times `look_ratio`, up to the budget `n`. `min_gain`: max_radius mode stops when sampling to
    the budget would add less than this to the radius.
    """

    radii: tuple[float, ...] | None = None
    test: str = "mixture"
    first_look: int = 100
    look_ratio: float = 1.5
    min_gain: float = 0.02

    @property
    def sequential(self) -> bool:
        return self.mode in SEQUENTIAL_MODES

    @property
    def self_sampling(self) -> bool:
        """A sequential certifier decides per image how many draws to take, so it samples through `run`."""
        return self.sequential

    @property
    def targets(self) -> tuple[float, ...]:
        """`mode="sequential"` decides only its target radii; every other mode, every radius (empty)."""
        return tuple(self.radii) if self.mode == "sequential" else ()

    def _check_sequential(self) -> None:
        defaults = SequentialOptions()
        if not self.sequential:
            given = [name for name in SEQUENTIAL_FIELDS if getattr(self, name) != getattr(defaults, name)]
            if given:
                raise ValueError(f"{self.name}: {given} apply only with mode 'sequential' or 'max_radius', "
                                 f"not mode {self.mode!r}")
            return
        if self.mode == "sequential":
            radii = self.radii
            if isinstance(radii, numbers.Real):
                radii = (radii,)
            if not (isinstance(radii, list | tuple) and radii and all(
                    isinstance(r, numbers.Real) and not isinstance(r, bool) and math.isfinite(r) and r >= 0
                    for r in radii)):
                raise ValueError(f"{self.name}: mode 'sequential' needs radii, a non-empty list of target radii "
                                 f">= 0, got {self.radii!r}")
            object.__setattr__(self, "radii", tuple(sorted({float(r) for r in radii})))
        elif self.radii is not None:
            raise ValueError(f"{self.name}: mode 'max_radius' finds the largest radius itself; drop radii "
                             f"{self.radii!r} (or use mode 'sequential')")
        self._require_choice("test", stats.SEQUENTIAL_TESTS)
        self._require_count("first_look", 1)
        if self.first_look > self.n:
            raise ValueError(f"{self.name}: first_look ({self.first_look}) must not exceed the budget n ({self.n})")
        if not (isinstance(self.look_ratio, numbers.Real) and self.look_ratio > 1):
            raise ValueError(f"{self.name}: look_ratio must be a number > 1, got {self.look_ratio!r}")
        if not (isinstance(self.min_gain, numbers.Real) and self.min_gain >= 0):
            raise ValueError(f"{self.name}: min_gain must be a number >= 0, got {self.min_gain!r}")

    def _setting_items(self) -> dict:
        items = super()._setting_items()
        if not self.sequential:
            items = {key: value for key, value in items.items() if key not in SEQUENTIAL_FIELDS}
        elif self.mode == "max_radius":
            items.pop("radii")
        else:
            items.pop("min_gain")
        return items

    def reusable_draws(self, labeled: bool) -> list[Draws]:
        """The selection draws and every look: a counting certifier with the same sigma (fixed-N Cohen or
        TopK) draws their prefixes, and their counts answer the looks without new forward passes. Each
        certificate keeps its own guarantee: a look's counts are the same whoever drew them."""
        if not self.sequential:
            return []
        return [self.noise_draws(SELECTION, self.n0), *(self.noise_draws(ESTIMATION, n) for n in self.looks())]

    def looks(self) -> list[int]:
        return block_looks(self.first_look, self.look_ratio, self.n)

    def estimate(self, radii_at: Callable[[np.ndarray, int], tuple[float, float]]
                 ) -> Generator[Draws, np.ndarray, Outcome]:
        """Draws estimation looks until the image is decided. `radii_at(counts, look)` gives the radius
        from the lower bounds and the radius from the upper bounds at that look (<= 0: none)."""
        targets = np.asarray(self.radii or (), dtype=float)
        looks = self.looks()
        best, worst = -math.inf, math.inf
        stopped = "budget"
        for look, n in enumerate(looks, 1):
            counts = yield self.noise_draws(ESTIMATION, n)
            low, high = radii_at(counts, look)
            best, worst = max(best, low), min(worst, high)
            if self.mode == "sequential":
                if np.all((best > targets) | (worst <= targets)):
                    stopped = "decided"
                    break
            elif worst <= 0:
                stopped = "futility"
                break
            elif best > 0 and look < len(looks):  # the radius at the budget if the frequencies held
                projected = np.rint(np.asarray(counts) * (looks[-1] / n)).astype(np.int64)
                if radii_at(projected, len(looks))[0] - best < self.min_gain:
                    stopped = "saturated"
                    break
        certified = [float(r) for r in targets if best > r]
        ruled_out = [float(r) for r in targets if not best > r and worst <= r]
        return Outcome(counts=np.asarray(counts), draws=n, looks=look, radius=best, optimistic=worst,
                       stopped=stopped, certified=certified, ruled_out=ruled_out)


def top_class(certifier, scale: float = 1.0) -> Generator[Draws, np.ndarray, tuple[int, Outcome]]:
    """Sequential CERTIFY for a smoothed top-1 vote (Cohen; Smooth-Reduce): the top class of `n0`
    selection draws, then estimation looks with radius scale * sigma * Phi^-1(bound on its probability).
    Returns (top class, outcome)."""
    selection = yield certifier.noise_draws(SELECTION, certifier.n0)
    top = int(np.argmax(selection))

    def radii_at(counts: np.ndarray, look: int) -> tuple[float, float]:
        lower, upper = stats.sequential_bounds(int(counts[top]), int(counts.sum()), look, certifier.alpha,
                                               certifier.test)
        with np.errstate(divide="ignore"):
            return scale * certifier.sigma * float(ndtri(lower)), scale * certifier.sigma * float(ndtri(upper))

    outcome = yield from certifier.estimate(radii_at)
    return top, outcome
