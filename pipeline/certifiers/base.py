"""What every certifier shares: the certificate it returns, its cost, the noise stages, the checks on its
settings, and what it declares about itself for the readers of its rows.

A certifier is one of three kinds (`Certifier.kind`, written to every row's `kind` column):

- COUNTING (the default): it says which noise it needs, by role (`draws`), and turns the class counts the
  engine returns for those roles into a `Certificate` (`certify`). The math lives in plain functions on
  counts, so it is testable on stored counts without a model.
- SAMPLING (`self_sampling` true: Smooth-Reduce, the sequential modes): later draws depend on earlier ones,
  so it samples itself (`run`), through the session it is given (`pipeline.sampling.Session`: the engine's
  sampling calls for one step, and their record). It still certifies a class.
- OUTPUT (`classifies` false: center smoothing): it certifies the model's outputs, not a class, sampling
  through `run` as the sampling kind does. Its rows have no prediction; it fills `eps_in` (the input radius)
  and `eps_out` (the certified bound on the output distance), and may fill `metric`, `output` and
  `smoothing_error`.

Every certificate states its own cost (`Cost`): the draws it rests on and the model evaluations behind them,
every forward pass included (a clean pass, one per patch): the row's `forward_passes` comes from the cost
alone. Every certifier also states its `norm`, its `max_radius` (the largest radius its settings can
certify, None where there is none fixed) and its `targets` (the only radii a sequential mode decides),
which the row builder records, so that reports read columns and never re-derive a certifier from its
setting string. It also states the noise it draws (`noise_kind`) and what its radius covers (`covers`):
"real" (every real perturbation in the ball, under the theorem's real-valued noise) or "grid 1/255" (every
perturbation on the 1/255 grid in the ball, under noise that floating point draws exactly).

`GaussianNoise` is the choice of the Gaussian certifiers (Cohen, TopK, Center, Smooth-Reduce):
`gaussian="sound"` draws `pipeline.noise.SoundGaussian` (inputs on the 1/255 grid, refused otherwise),
`"real"` the float Gaussian, and `"auto"` (the default) resolves to "sound" for inputs that are all on the
1/255 grid (every 8-bit image: the run configs resolve it so, as decoded images always are) and to "real"
otherwise (`for_inputs`); rows record the resolved choice.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from pipeline.engine import Draws
from pipeline.noise import GRID_TOLERANCE, grid_deviation

ABSTAIN = -1

# Noise stages. A draw is a pure function of (seed, image id, stage, index): certifiers that ask for the same
# stage at the same sigma (and noise kind) get the same draws, which is how Cohen and TopK share passes.
SELECTION = "selection"  # draws that choose the class to certify
ESTIMATION = "estimation"  # fresh draws that bound its probability (DSSN: all L offsets)
DSSN_OFFSETS = "dssn"
CENTER_SEARCH = "center_search"  # the samples the centre is searched among (or measured against)
CENTER_CANDIDATES = "center_candidates"  # the candidate centres of `centers=k`
CENTER_CHECK = "center_check"

# Kinds of certifier (the rows' `kind` column; see the module docstring).
COUNTING = "counting"
SAMPLING = "sampling"
OUTPUT = "output"
KINDS = (COUNTING, SAMPLING, OUTPUT)

# What a radius covers (the rows' `covers` column) and the Gaussian certifiers' choices of noise.
REAL = "real"
GRID = "grid 1/255"
GAUSSIAN_CHOICES = ("auto", "sound", "real")

__all__ = ["ABSTAIN", "CENTER_CANDIDATES", "CENTER_CHECK", "CENTER_SEARCH", "COUNTING", "DSSN_OFFSETS",
           "ESTIMATION", "GAUSSIAN_CHOICES", "GRID", "KINDS", "OUTPUT", "REAL", "SAMPLING", "SELECTION", "Certificate",
           "Certifier", "Cost", "GaussianNoise"]


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class Cost:
    """What a certificate rests on: `n` estimation draws (center: the m certification draws), `n0` draws
    before them (selection; center: the centre search and check) and the model evaluations behind them
    (`forward_passes`: n0 + n unless one draw costs more, as Smooth-Reduce's patches do)."""

    n: int
    n0: int = 0
    forward_passes: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "n", int(self.n))
        object.__setattr__(self, "n0", int(self.n0))
        if self.forward_passes is None:
            object.__setattr__(self, "forward_passes", self.n + self.n0)


NO_COST = Cost(0, 0, 0)


@dataclass(frozen=True, kw_only=True)
class Certificate:
    """One certifier's verdict on one image, with its cost. A classifier's certificate has `prediction`
    ABSTAIN (-1) with radius 0 when it abstains; a certificate about outputs (center smoothing) has no
    prediction and says `abstained` itself. `extra` holds values of the result columns only some certifiers
    fill; `details` go into the row's params. `error` says why an image could not be examined at all."""

    prediction: int | None
    radius: float
    cost: Cost
    p_lower: float | None = None
    count: int | None = None
    topk_labels: list[int] | None = None
    abstained: bool | None = None
    extra: dict | None = None
    details: dict | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if self.abstained is None:
            object.__setattr__(self, "abstained", self.prediction == ABSTAIN)

    @classmethod
    def failed(cls, message: str) -> Certificate:
        """The stand-in for an image that could not be examined (unreadable, wrong shape, ...): no certificate."""
        return cls(prediction=ABSTAIN, radius=0.0, cost=NO_COST, abstained=True, error=message)


@dataclass(frozen=True, kw_only=True)
class Certifier:
    """Base of the certifiers: Gaussian smoothing at scale `sigma` with failure probability `alpha`."""

    name: ClassVar[str]
    norm: ClassVar[str] = "l2"
    deterministic: ClassVar[bool] = False  # True: the certificate holds with certainty (alpha = 0)
    classifies: ClassVar[bool] = True  # False: certifies outputs, not a class (no prediction, no `correct`)
    own_head: ClassVar[bool] = False  # True: runs its own head on the noisy inputs (not for noise-conditioned models)

    sigma: float
    alpha: float = 0.001

    def __post_init__(self) -> None:
        if not (_is_real(self.sigma) and math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"{self.name}: sigma must be a finite number > 0, got {self.sigma!r}")
        if self.deterministic:
            if self.alpha != 0:
                raise ValueError(f"{self.name}: alpha must be 0, the certificate is deterministic; got {self.alpha!r}")
        elif not (_is_real(self.alpha) and 0 < self.alpha < 1):
            raise ValueError(f"{self.name}: alpha must lie in (0, 1), got {self.alpha!r}")

    @property
    def failure_probability(self) -> float:
        """The probability that a certificate of these settings is wrong (the row's `alpha`)."""
        return self.alpha

    def _require_count(self, field: str, minimum: int) -> None:
        value = getattr(self, field)
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:  # 1e5 in YAML
            value = int(value)
            object.__setattr__(self, field, value)
        if not (isinstance(value, numbers.Integral) and not isinstance(value, bool)) or value < minimum:
            raise ValueError(f"{self.name}: {field} must be an integer >= {minimum}, got {value!r}")

    def _require_choice(self, field: str, choices: tuple[str, ...]) -> None:
        if getattr(self, field) not in choices:
            raise ValueError(f"{self.name}: {field} must be one of {choices}, got {getattr(self, field)!r}")

    def check_num_classes(self, num_classes: int) -> None:
        """Raises ValueError when the settings cannot apply to a model with this many classes."""

    def num_classes(self, engine, image) -> int:
        """The number of classes of the classifier this certifier smooths, probed on one clean image."""
        return engine.num_classes(image)

    def check_images(self, images, image_ids) -> None:
        """Raises ValueError, naming the image, when an input lies outside the certifier's threat model."""

    def for_inputs(self, on_grid: bool) -> Certifier:
        """This certifier for inputs that are all on the 1/255 grid (`on_grid`) or not: itself, unless a
        setting depends on it (`GaussianNoise`'s "auto")."""
        return self

    @property
    def noise_kind(self) -> str:
        """The noise kind(s) it draws (`pipeline.noise.NOISE_KINDS`), for the row's `noise` column."""
        requests = [*self.draws(labeled=True).values(), *self.reusable_draws(labeled=True)]
        return ",".join(sorted({draws.noise for draws in requests})) or "gaussian"

    @property
    def covers(self) -> str:
        """What its radius covers: REAL (every real perturbation in the ball) or GRID (those on the grid)."""
        return REAL

    @property
    def self_sampling(self) -> bool:
        """True when later draws depend on earlier ones, so the certifier samples through `run`."""
        return False

    # what readers of the rows need (recorded by `pipeline.results.result_row`)
    @property
    def kind(self) -> str:
        """COUNTING, SAMPLING or OUTPUT: how it certifies, and whether it certifies a class at all."""
        if not self.classifies:
            return OUTPUT
        return SAMPLING if self.self_sampling else COUNTING

    @property
    def targets(self) -> tuple[float, ...]:
        """The only radii these settings decide (a sequential mode's target radii); empty: every radius."""
        return ()

    def max_radius(self, num_classes: int | None = None, details: Mapping | None = None) -> float | None:
        """The largest radius these settings can certify, for a model of `num_classes` classes (None: not
        known) and a certificate with these `details` (per-image values it may depend on); None where there
        is no fixed maximum. A counting certifier's is its certificate when every draw votes for one class;
        a sampling or output certifier has none unless it says so."""
        if self.kind != COUNTING:
            return None
        unanimous = np.eye(max(2, num_classes or 2), dtype=np.int64)[0]
        counts = {role: unanimous * draws.n for role, draws in self.draws(labeled=True).items()}
        return float(self.certify(counts, 0).radius)

    # counting certifiers
    def draws(self, labeled: bool) -> dict[str, Draws]:
        """The noise this certifier needs for every image, by role (SELECTION, ESTIMATION); `labeled` says
        whether true labels are given."""
        return {}

    def certify(self, counts: Mapping[str, np.ndarray], label: int | None) -> Certificate:
        """The certificate for one image from its class counts, keyed by the roles of `draws`."""
        raise NotImplementedError

    # sampling certifiers
    @property
    def feeds_counts(self) -> bool:
        """True when it samples before the counting certifiers and the model's top-1 votes on its draws
        answer their requests on the same stream (center smoothing's certification stage)."""
        return False

    def reusable_draws(self, labeled: bool) -> list[Draws]:
        """The requests for the model's own top-1 votes this sampling certifier may make first (a sequential
        mode's selection and looks), whose counts it can take from the counting certifiers' pass when that
        pass draws the same stream that far (the batch's `pipeline.votes.VoteCache`); none by default."""
        return []

    def run(self, session, images, image_ids: list[str], seed: int,
            labels: list[int | None] | None = None) -> list[Certificate]:
        """Sample through `session` (`pipeline.sampling.Session`; its `engine` holds the model) and certify
        every image (`labels`, when given, are the true classes); every forward pass run goes into the
        certificates' `Cost`."""
        raise NotImplementedError

    def _setting_items(self) -> dict:
        """The settings that make this certifier what it is (those that do not apply are left out)."""
        return dataclasses.asdict(self)

    def params(self, input_shape: tuple | None = None) -> dict:
        """Every setting, for the result row (plus what depends on the input shape, where it is known)."""
        return {"certifier": self.name, **self._setting_items()}

    @property
    def setting(self) -> str:
        """A readable identity of the settings, e.g. 'cohen(sigma=0.25, alpha=0.001, n0=100, n=100000, ...)'."""
        values = ", ".join(f"{key}={value}" for key, value in self._setting_items().items())
        return f"{self.name}({values})"


@dataclass(frozen=True, kw_only=True)
class GaussianNoise:
    """The Gaussian certifiers' noise (mixed in before `Certifier`): `gaussian` = "sound" (integer noise on the
    1/255 grid, `pipeline.noise.SoundGaussian`: the radius covers perturbations on the grid, and holds for the
    network as floating point runs it), "real" (x + sigma eps in float: the radius of the real-valued theorem,
    which floating point does not guarantee) or "auto" (sound for inputs on the grid, else real; see
    `for_inputs`). Every request for draws goes through `noise_draws`."""

    gaussian: str = "auto"

    def _check_gaussian(self) -> None:
        self._require_choice("gaussian", GAUSSIAN_CHOICES)

    @property
    def noise_kind(self) -> str:
        return "sound_gaussian" if self.gaussian == "sound" else "gaussian"

    @property
    def covers(self) -> str:
        return {"sound": GRID, "real": REAL}.get(self.gaussian, f"{GRID} or {REAL}, resolved per input")

    def noise_draws(self, stage: str, n: int) -> Draws:
        """A request for n draws of `stage` of this certifier's Gaussian noise at its sigma."""
        return Draws(stage, self.sigma, n, noise=self.noise_kind)

    def for_inputs(self, on_grid: bool):
        if self.gaussian != "auto":
            return self
        return dataclasses.replace(self, gaussian="sound" if on_grid else "real")

    def check_images(self, images, image_ids) -> None:
        if self.gaussian != "sound":
            return
        for image_id, deviation in zip(image_ids, grid_deviation(images).tolist(), strict=True):
            if deviation > GRID_TOLERANCE:
                raise ValueError(f"{self.name}: image {image_id} is not on the 1/255 grid (largest deviation "
                                 f"{deviation / 255:.3g} from a multiple of 1/255); gaussian='sound' needs 8-bit "
                                 f"inputs, use gaussian='real' for others (its radius is not floating-point sound)")

    def _setting_items(self) -> dict:
        """The settings, `gaussian` last, and only when "sound": the real noise keeps the setting string rows
        had before the choice existed (all Gaussian noise was real then). An unresolved "auto" is named as
        the real noise is, which is what it resolves to off the grid; rows always carry the resolved choice
        (`pipeline.certification` resolves it for its inputs, a run config for 8-bit images)."""
        items = super()._setting_items()
        choice = items.pop("gaussian")
        return {**items, "gaussian": choice} if choice == "sound" else items
