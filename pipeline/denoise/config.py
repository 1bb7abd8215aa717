"""The denoiser training config (`jobs/configs/denoiser_demo.yaml`) and its sections, each with its rules:
a `DenoiserConfig` that exists is valid; `DenoiserConfig.from_dict` reads YAML data, ConfigError naming
every bad key."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_serializer, model_validator

from pipeline.data.sources import DatasetSpec
from pipeline.models import ModelSpec
from pipeline.sections import Count, Name, Number, Section
from pipeline.storage import Storage

OBJECTIVES = ("mse", "stab", "clf", "stab_mse", "decrop")

__all__ = ["OBJECTIVES", "DenoiserConfig", "DenoiserShape", "GenerationSettings", "LossWeights", "Subset"]

Positive = Annotated[Number, Field(gt=0.0)]
NonNegative = Annotated[Number, Field(ge=0.0)]


class GenerationSettings(Section):
    """DE-CROP's extra views (see `pipeline.denoise.generate`): L-inf PGD of `steps` steps of `step` in an
    `eps` ball, and the interpolation towards `mix` of the clean logits."""

    eps: NonNegative = 8 / 255
    step: Positive = 2 / 255
    steps: Count = Field(20, ge=0)
    random_start: bool = True
    mix: Annotated[Number, Field(ge=0.0, le=1.0)] = 0.8
    interp_steps: Count = Field(50, ge=0)
    interp_lr: Positive = 1e-3
    interp_tolerance: NonNegative = 1e-3
    interp_mode: Literal["paper", "reference"] = "paper"
    seed: int = 0


class Subset(Section):
    """The few-sample subset: `per_class` images of every class, or a `fraction` of the data (0.01 when
    neither is given), drawn with `seed`; `validation` of each class's draw is held out for selection."""

    per_class: Count | None = Field(None, ge=1)
    fraction: Number | None = None
    seed: int = 3
    validation: Number = 0.2

    @model_validator(mode="before")
    @classmethod
    def _one_of(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("per_class") is None and data.get("fraction") is None:
            return {**data, "fraction": 0.01}
        return data

    @model_validator(mode="after")
    def _check(self) -> Subset:
        if self.per_class is not None and self.fraction is not None:
            raise ValueError("{where}: give one of per_class or fraction")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"{{where}}.fraction must lie in (0, 1], got {self.fraction!r}")
        if not 0 <= self.validation < 1:
            raise ValueError(f"{{where}}.validation must lie in [0, 1), got {self.validation!r}")
        return self


class LossWeights(Section):
    """The weights of DE-CROP's losses: Stab, logit cosine and feature MMD (stage 1), and the gradient
    reversal's DANN scale (stage 2)."""

    stab: Number = 1.0
    cosine: Number = 4.0
    mmd: Number = 4.0
    dann: Number = 2.0


class DenoiserShape(Section):
    """The DnCNN trained: `depth` convolutions of `channels` channels (`wide`: the wide variant)."""

    depth: Count = Field(17, ge=3)
    channels: Count = Field(64, ge=1)
    wide: bool = False


class DenoiserConfig(Section):
    """Everything a denoiser training run needs (see jobs/configs/denoiser_demo.yaml); `from_dict` reads it
    from YAML data, ConfigError naming every bad key."""

    unknown_keys = "unknown denoiser config key(s)"

    classifier: ModelSpec
    objective: Literal[OBJECTIVES] = "stab"
    sigma: Positive = 0.25
    access: Literal["white_box", "black_box"] = "white_box"
    surrogate: ModelSpec | None = None
    denoiser: DenoiserShape = DenoiserShape(depth=17, channels=64, wide=False)
    dataset: DatasetSpec = DatasetSpec(split="train")
    subset: Subset = Subset()
    epochs: Count = Field(90, ge=1)
    second_epochs: Count = Field(0, ge=0)
    batch_size: Count = Field(256, ge=1)
    lr: Positive = 1e-3
    second_lr: Positive | None = None
    weight_decay: NonNegative = 1e-4
    step_size: Count = Field(30, ge=1)
    gamma: Positive = 0.1
    disc_lr: Positive = 1e-5
    weights: LossWeights = LossWeights()
    generation: GenerationSettings = GenerationSettings()
    augment: bool = True
    seed: int = 0
    output: str = "runs/denoisers"
    run_name: Name = "denoiser"
    storage: Storage = Storage()
    cache: str | None = None
    workers: Count = Field(0, ge=0)
    use_gpu: bool = False

    @model_validator(mode="after")
    def _check(self) -> DenoiserConfig:
        if self.access == "black_box" and self.surrogate is None:
            raise ValueError("access: black_box needs a `surrogate` classifier for gradients (the target is used "
                             "only through its outputs)")
        return self

    @field_serializer("denoiser")
    def _given_shape(self, shape: DenoiserShape) -> dict[str, Any]:
        """The denoiser keys as given (what earlier trainings recorded)."""
        return shape.model_dump(exclude_unset=True)
