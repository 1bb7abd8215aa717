"""What every certifier shares: the certificate it returns and the checks on its settings.

A certifier says which noise it needs (`draws`) and turns the counts the engine returns into a
`Certificate` (`certify`). The math lives in plain functions on counts, so it is testable on stored
counts without a model.
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

ABSTAIN = -1


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)

__all__ = ["ABSTAIN", "Certificate", "Certifier"]


@dataclass(frozen=True)
class Certificate:
    """One certifier's verdict on one image. A classifier's certificate has `prediction` ABSTAIN (-1) with
    radius 0 when it abstains; a certificate about outputs (center smoothing) has no prediction and says
    `abstained` itself. `extra` holds values of the result columns only some certifiers fill."""

    prediction: int | None
    radius: float
    p_lower: float | None = None
    count: int | None = None
    topk_labels: list[int] | None = None
    abstained: bool | None = None
    extra: dict | None = None
    details: dict | None = None  # per-image settings, recorded in the row's params
    forward_passes: int | None = None  # model evaluations, where they differ from the certifier's draws
    draws: int | None = None  # estimation draws used, where they differ from the certifier's n (sequential)
    selection_draws: int | None = None  # selection draws used, where they differ from the certifier's n0

    def __post_init__(self) -> None:
        if self.abstained is None:
            object.__setattr__(self, "abstained", self.prediction == ABSTAIN)


@dataclass(frozen=True, kw_only=True)
class Certifier:
    """Base of the certifiers: Gaussian smoothing at scale `sigma` with failure probability `alpha`."""

    name: ClassVar[str]
    norm: ClassVar[str] = "l2"
    deterministic: ClassVar[bool] = False  # True: the certificate holds with certainty (alpha = 0)
    classifies: ClassVar[bool] = True  # False: certifies outputs, not a class (no prediction, no `correct`)
    self_sampling: ClassVar[bool] = False  # True: later stages depend on earlier ones; samples through `run`

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

    def draws(self, labeled: bool) -> list[Draws]:
        """The noise this certifier needs for every image; `labeled` says whether true labels are given."""
        return []

    def run(self, engine, images, image_ids: list[str], seed: int,
            labels: list[int | None] | None = None) -> list[Certificate]:
        """For self-sampling certifiers: sample through `engine` and certify every image (`labels`, when
        given, are the true classes)."""
        raise NotImplementedError

    def draw_counts(self) -> tuple[int, int]:
        """For self-sampling certifiers: (estimation draws n, draws before them n0) per image."""
        raise NotImplementedError

    def certify(self, counts: Mapping[Draws, np.ndarray], label: int | None) -> Certificate:
        """The certificate for one image from its count vectors, keyed by the requests of `draws`."""
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
