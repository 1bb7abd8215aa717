"""Configurations: YAML in, validated typed configs out, with one error type (ConfigError) naming the bad key.

- `RunConfig`: a certification run (`jobs/configs/demo.yaml`, annotated; `jobs/configs/imagenet.yaml`, the
  papers' setting), with its `DatasetSpec`, `ModelSpec`, `Actors` and `Storage` sections;
- `DenoiserConfig`: a denoiser training (`jobs/configs/denoiser_demo.yaml`), with `Subset`, `LossWeights` and
  DE-CROP's `GenerationSettings`;
- `SweepConfig`: a Ray Tune sweep over a training config (`jobs/configs/sweep_demo.yaml`);
- `NightlySuite`: the nightly benchmark (`jobs/configs/nightly_demo.yaml`).

Every default is stated once, on its dataclass field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import yaml

from pipeline.certifiers import REGISTRY, Certifier
from pipeline.certifiers.cohen import max_radius
from pipeline.data.cifar import LAYOUTS as CIFAR_LAYOUTS
from pipeline.data.cifar import SPLITS as CIFAR_SPLITS
from pipeline.data.sources import LAYOUTS, DatasetSpec
from pipeline.denoise.generate import GenerationSettings
from pipeline.engine import PRECISIONS
from pipeline.models import ModelSpec, model_names
from pipeline.storage import Storage, is_name

DEVICES = ("auto", "cpu", "cuda")
OBJECTIVES = ("mse", "stab", "clf", "stab_mse", "decrop")

SWEEP_METRICS = ("certified_accuracy", "acr")
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform")

__all__ = ["OBJECTIVES", "Actors", "ConfigError", "DenoiserConfig", "LossWeights", "NightlySuite", "RunConfig",
           "Subset", "SweepConfig", "apply_overrides", "check_dataset", "check_model", "load_config", "load_sweep",
           "parse_yaml", "read_yaml", "section", "set_dotted", "validate"]


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key."""


@dataclass(frozen=True)
class Actors:
    """The certification actor pool: `count` actors, each with `gpus` GPUs (fractions allowed) and `cpus`."""

    count: int = 1
    gpus: float = 0
    cpus: float = 1


@dataclass(frozen=True)
class RunConfig:
    """Everything a certification run needs."""

    certifiers: list[dict[str, Any]]
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    run_id: str = "demo"
    output: str = "runs"
    storage: Storage = field(default_factory=Storage)
    seed: int = 0
    batch_size: int | str = "auto"
    images_per_batch: int = 16
    device: str = "auto"
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool | str = False
    actors: Actors = field(default_factory=Actors)
    report_radii: list[float] | None = None

    def build_certifiers(self) -> list[Certifier]:
        """The certifier objects, each validated; a bad entry raises ConfigError naming it."""
        built = []
        for position, entry in enumerate(self.certifiers):
            where = f"certifiers[{position}]"
            settings = dict(entry)
            name = settings.pop("name", None)
            if name not in REGISTRY:
                raise ConfigError(f"{where}.name: unknown certifier {name!r}; known: {sorted(REGISTRY)}")
            known = {f.name for f in dataclasses.fields(REGISTRY[name])}
            unknown = sorted(set(settings) - known)
            if unknown:
                raise ConfigError(f"{where}: unknown setting(s) {unknown} for {name!r}; known: {sorted(known)}")
            try:
                built.append(REGISTRY[name](**settings))
            except (TypeError, ValueError) as error:
                raise ConfigError(f"{where}: {error}") from error
        settings = [certifier.setting for certifier in built]
        repeated = sorted({s for s in settings if settings.count(s) > 1})
        if repeated:
            raise ConfigError(f"certifiers: the same setting appears twice: {repeated}")
        return built

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain data (YAML / JSON), sections included; `validate` reads it back."""
        return dataclasses.asdict(self)


def section(kind: type, where: str, value: Any):
    """A config section (a mapping, or already the typed object) as its frozen dataclass `kind`; ConfigError
    naming unknown keys."""
    if isinstance(value, kind):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a mapping")
    _require_known(kind, value, f"{where}: unknown key(s)")
    typed = kind(**value)
    if kind is Storage:
        _require(_is_number(typed.retry_seconds) and typed.retry_seconds >= 0,
                 f"{where}.retry_seconds must be a number of seconds >= 0, got {typed.retry_seconds!r}")
    return typed


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """data[a][b][c] = value for "a.b.c"; a number indexes a list (certifiers.0.sigma)."""
    *path, last = [int(key) if key.isdigit() else key for key in dotted.split(".")]
    target = data
    for key in path:
        target = target[key] if isinstance(key, int) else target.setdefault(key, {})
    target[last] = value


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, reading exponent floats without a dot (1e5, 2.5e-3) as numbers, as YAML 1.2 and
    Python do, instead of as strings (YAML 1.1)."""


EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT_FLOAT, list("-+0123456789"))


def parse_yaml(text: str):
    """YAML text as data, through a subclass of the safe loader: plain data only, no object construction."""
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:
    """A YAML mapping from `path` (empty without one), with `key=value` overrides applied (dotted keys, a
    number indexing a list, YAML values); ConfigError naming the file or the override."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = parse_yaml(Path(path).read_text()) or {}
        except OSError as error:
            raise ConfigError(f"cannot read config file {path}: {error.strerror}") from error
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from error
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    return apply_overrides(data, overrides)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`key=value` overrides applied to `data` in place (dotted keys, a number indexing a list, YAML values)."""
    for override in overrides:
        key, separator, text = override.partition("=")
        if not separator or not key:
            raise ConfigError(f"--set expects key=value, got {override!r}")
        try:
            value = parse_yaml(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {override!r}: the value is not valid YAML ({error.problem})") from error
        try:
            set_dotted(data, key.strip(), value)
        except (IndexError, AttributeError, TypeError, KeyError) as error:
            raise ConfigError(f"--set {override!r}: no such place in the config") from error
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = (), **values: Any) -> RunConfig:
    """Reads YAML from `path`, applies `key=value` overrides (dotted keys, YAML values), then `values`."""
    data = read_yaml(path, overrides)
    data.update({key: value for key, value in values.items() if value is not None})
    return validate(data)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _require_known(kind: type, data: dict, unknown_message: str) -> None:
    """ConfigError `unknown_message` with the keys of `data` that are no field of `kind`, and the known ones."""
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - known)
    _require(not unknown, f"{unknown_message} {unknown}; known: {sorted(known)}")


def _require_name(value: Any, key: str, names: str) -> None:
    _require(is_name(value), f"{key} must be letters, digits, '.', '_' or '-', starting with a letter or digit (it "
                             f"names {names}), got {value!r}")


def _is_count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive(value: Any) -> bool:
    return _is_number(value) and value > 0


def validate(data: dict[str, Any]) -> RunConfig:
    """A RunConfig from a mapping, or ConfigError naming the first bad key."""
    _require_known(RunConfig, data, "unknown config key(s)")
    _require(isinstance(data.get("certifiers"), list) and bool(data["certifiers"]),
             "certifiers: give a non-empty list, e.g. [{name: cohen, sigma: 0.25}]")
    _require(all(isinstance(entry, dict) for entry in data["certifiers"]),
             "certifiers: every entry must be a mapping with a 'name'")
    sections = {"dataset": DatasetSpec, "model": ModelSpec, "storage": Storage, "actors": Actors}
    config = RunConfig(**{**data, **{key: section(kind, key, data.get(key, {})) for key, kind in sections.items()}})
    check_dataset(config.dataset)
    check_model(config.model)
    _require_name(config.run_id, "run_id", "the run's folder")
    _require(isinstance(config.output, str) and bool(config.output), "output: give a directory or s3:// URI")
    _require(config.batch_size == "auto" or _is_count(config.batch_size, 1),
             f"batch_size must be 'auto' or an integer >= 1, got {config.batch_size!r}")
    _require(_is_count(config.images_per_batch, 1),
             f"images_per_batch must be an integer >= 1, got {config.images_per_batch!r}")
    _require(isinstance(config.seed, int), f"seed must be an integer, got {config.seed!r}")
    _require(config.device in DEVICES, f"device must be one of {list(DEVICES)}, got {config.device!r}")
    _require(config.precision in PRECISIONS,
             f"precision must be one of {sorted(PRECISIONS)}, got {config.precision!r}")
    _require(isinstance(config.channels_last, bool),
             f"channels_last must be true or false, got {config.channels_last!r}")
    _require(isinstance(config.compile, bool | str) and config.compile != "",
             f"compile must be true, false or a torch.compile backend name, got {config.compile!r}")
    check_actors(config.actors)
    _require(config.report_radii is None or (isinstance(config.report_radii, list) and
                                             all(isinstance(r, int | float) and r >= 0 for r in config.report_radii)),
             f"report_radii must be a list of radii >= 0, got {config.report_radii!r}")
    config.build_certifiers()
    return config


def check_dataset(dataset: DatasetSpec, where: str = "dataset") -> None:
    """ConfigError naming the first bad key of a dataset entry."""
    _require(dataset.layout in LAYOUTS, f"{where}.layout: unknown layout {dataset.layout!r}; known: {list(LAYOUTS)}")
    _require(dataset.layout == "demo" or bool(dataset.root),
             f"{where}.root: the {dataset.layout} layout needs a root path or s3:// URI")
    _require(dataset.id in ("name", "relative_path"),
             f"{where}.id must be 'name' or 'relative_path', got {dataset.id!r}")
    _require(_is_count(dataset.skip, 1), f"{where}.skip must be an integer >= 1 (every skip-th image), got "
                                         f"{dataset.skip!r}")
    _require(dataset.layout not in CIFAR_LAYOUTS or dataset.split in CIFAR_SPLITS,
             f"{where}.split: {dataset.layout} has the splits {list(CIFAR_SPLITS)}, got {dataset.split!r}")
    _require(isinstance(dataset.split, str) and bool(dataset.split), f"{where}.split must name a split, got "
                                                                     f"{dataset.split!r}")
    for key in ("image_column", "label_column"):
        value = getattr(dataset, key)
        _require(value is None or (isinstance(value, str) and bool(value)),
                 f"{where}.{key} must name a column (or be null), got {value!r}")
    _require(dataset.max is None or _is_count(dataset.max, 1),
             f"{where}.max must be an integer >= 1 or null, got {dataset.max!r}")
    transform = dataset.transform
    _require(_is_count(transform.size, 1), f"{where}.size (the centre-crop side) must be an integer >= 1, "
                                           f"got {transform.size!r}")
    _require(transform.resize is None or _is_count(transform.resize, transform.size),
             f"{where}.resize must be an integer >= {where}.size, got {transform.resize!r}")
    _require(_is_count(transform.channels, 1), f"{where}.channels must be an integer >= 1, got {transform.channels!r}")
    _require(_is_count(transform.max_pixels, 1),
             f"{where}.max_pixels must be an integer >= 1, got {transform.max_pixels!r}")
    if dataset.mode is not None:
        _require(dataset.mode in PIL.Image.MODES,
                 f"{where}.mode: unknown image mode {dataset.mode!r}; use one of PIL's, e.g. RGB or L (or null)")
        bands = PIL.Image.getmodebands(dataset.mode)
        _require(bands == transform.channels, f"{where}.mode {dataset.mode} has {bands} channel(s), but "
                                              f"{where}.channels is {transform.channels}")


def check_model(model: ModelSpec, where: str = "model") -> None:
    """ConfigError naming the first bad key of a model entry (its weights are read when the model is loaded:
    without a name, their `arch` names the architecture)."""
    _require(model.name is not None or (isinstance(model.weights, str) and bool(model.weights)),
             f"{where}: give a name, or weights whose checkpoint names its architecture ('arch')")
    _require(model.name is None or model.name in model_names(),
             f"{where}.name: unknown model {model.name!r}; use demo_cnn, a CIFAR architecture "
             f"(cifar_resnet20, cifar_resnet110, cifar_wrn28_10, cifar_wrn40_10) or a torchvision classifier name")
    _require(model.num_classes is None or _is_count(model.num_classes, 1),
             f"{where}.num_classes must be an integer >= 1, got {model.num_classes!r}")
    _require(model.denoiser is None or (isinstance(model.denoiser, str) and bool(model.denoiser)),
             f"{where}.denoiser must be a path or URI (an artifact directory or a denoiser checkpoint), got "
             f"{model.denoiser!r}")
    if model.name == "demo_cnn":
        _require(model.mean is None and model.std is None,
                 f"{where}: demo_cnn normalises inside itself; remove {where}.mean and {where}.std")
    _require((model.mean is None) == (model.std is None), f"{where}: give both mean and std, or neither")
    if model.std is not None:
        _require(isinstance(model.mean, tuple) and isinstance(model.std, tuple),
                 f"{where}.mean and {where}.std must be lists of numbers, one per channel")
        _require(all(isinstance(value, int | float) and math.isfinite(value) and value > 0 for value in model.std),
                 f"{where}.std must hold finite numbers > 0 (the input is divided by it), got {list(model.std)}")
        _require(all(isinstance(value, int | float) and math.isfinite(value) for value in model.mean),
                 f"{where}.mean must hold finite numbers, got {list(model.mean)}")
        _require(len(model.mean) == len(model.std), f"{where}: mean and std must have one value per channel, got "
                                                    f"{len(model.mean)} and {len(model.std)}")


def check_actors(actors: Actors) -> None:
    _require(_is_count(actors.count, 1), f"actors.count must be an integer >= 1, got {actors.count!r}")
    for key in ("gpus", "cpus"):
        value = getattr(actors, key)
        _require(isinstance(value, int | float) and not isinstance(value, bool) and value >= 0,
                 f"actors.{key} must be a number >= 0, got {value!r}")


@dataclass(frozen=True)
class Subset:
    """The few-sample subset: `per_class` images of every class, or a `fraction` of the data (0.01 when
    neither is given), drawn with `seed`; `validation` of each class's draw is held out for selection."""

    per_class: int | None = None
    fraction: float | None = None
    seed: int = 3
    validation: float = 0.2

    def __post_init__(self) -> None:
        if self.per_class is None and self.fraction is None:
            object.__setattr__(self, "fraction", 0.01)
        _require(self.per_class is None or self.fraction is None, "subset: give one of per_class or fraction")
        _require(self.per_class is None or _is_count(self.per_class, 1),
                 f"subset.per_class must be an integer >= 1, got {self.per_class!r}")
        _require(self.fraction is None or (isinstance(self.fraction, int | float) and 0 < self.fraction <= 1),
                 f"subset.fraction must lie in (0, 1], got {self.fraction!r}")
        _require(isinstance(self.validation, int | float) and 0 <= self.validation < 1,
                 f"subset.validation must lie in [0, 1), got {self.validation!r}")


@dataclass(frozen=True)
class LossWeights:
    """The weights of DE-CROP's losses: Stab, logit cosine and feature MMD (stage 1), and the gradient
    reversal's DANN scale (stage 2)."""

    stab: float = 1.0
    cosine: float = 4.0
    mmd: float = 4.0
    dann: float = 2.0


@dataclass(frozen=True)
class DenoiserConfig:
    """Everything a denoiser training run needs (see jobs/configs/denoiser_demo.yaml); `from_dict` reads it
    from YAML data, ConfigError naming the first bad key."""

    classifier: ModelSpec
    objective: str = "stab"
    sigma: float = 0.25
    access: str = "white_box"
    surrogate: ModelSpec | None = None
    denoiser: dict[str, Any] = field(default_factory=lambda: {"depth": 17, "channels": 64, "wide": False})
    dataset: DatasetSpec = field(default_factory=lambda: DatasetSpec(split="train"))
    subset: Subset = field(default_factory=Subset)
    epochs: int = 90
    second_epochs: int = 0
    batch_size: int = 256
    lr: float = 1e-3
    second_lr: float | None = None
    weight_decay: float = 1e-4
    step_size: int = 30
    gamma: float = 0.1
    disc_lr: float = 1e-5
    weights: LossWeights = field(default_factory=LossWeights)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    augment: bool = True
    seed: int = 0
    output: str = "runs/denoisers"
    run_name: str = "denoiser"
    storage: Storage = field(default_factory=Storage)
    cache: str | None = None
    workers: int = 0
    use_gpu: bool = False

    def __post_init__(self) -> None:
        _require(self.objective in OBJECTIVES, f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        _require(self.access in ("white_box", "black_box"),
                 f"access must be 'white_box' or 'black_box', got {self.access!r}")
        _require(not (self.access == "black_box" and not self.surrogate),
                 "access: black_box needs a `surrogate` classifier for gradients (the target is used only through "
                 "its outputs)")
        _require(isinstance(self.sigma, int | float) and self.sigma > 0, f"sigma must be > 0, got {self.sigma!r}")
        for key in ("epochs", "batch_size"):
            _require(_is_count(getattr(self, key), 1), f"{key} must be an integer >= 1, got {getattr(self, key)!r}")
        _require(_is_count(self.second_epochs, 0), f"second_epochs must be an integer >= 0, got {self.second_epochs!r}")
        _require(_is_count(self.step_size, 1), f"step_size must be an integer >= 1, got {self.step_size!r}")
        _require(_is_count(self.workers, 0), f"workers must be an integer >= 0 (0: train in this process), got "
                                             f"{self.workers!r}")
        for key in ("lr", "second_lr", "gamma", "disc_lr"):
            value = getattr(self, key)
            _require((value is None and key == "second_lr") or _is_positive(value),
                     f"{key} must be a number > 0, got {value!r}")
        _require(_is_number(self.weight_decay) and self.weight_decay >= 0,
                 f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        _require_name(self.run_name, "run_name", "a folder under output")
        unknown = set(self.denoiser) - {"depth", "channels", "wide"}
        _require(not unknown, f"denoiser: unknown key(s) {sorted(unknown)}; known: depth, channels, wide")
        _require(_is_count(self.denoiser.get("depth", 17), 3),
                 f"denoiser.depth must be an integer >= 3, got {self.denoiser.get('depth')!r}")
        _require(_is_count(self.denoiser.get("channels", 64), 1),
                 f"denoiser.channels must be an integer >= 1, got {self.denoiser.get('channels')!r}")
        check_model(self.classifier, "classifier")
        if self.surrogate is not None:
            check_model(self.surrogate, "surrogate")
        check_dataset(self.dataset)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DenoiserConfig:
        _require_known(cls, data, "unknown denoiser config key(s)")
        _require("classifier" in data, "classifier: name the frozen classifier the denoiser is trained for")
        sections = {"classifier": section(ModelSpec, "classifier", data["classifier"]),
                    "dataset": section(DatasetSpec, "dataset", data.get("dataset", {"split": "train"})),
                    "storage": section(Storage, "storage", data.get("storage", {})),
                    "subset": section(Subset, "subset", data.get("subset", {})),
                    "weights": section(LossWeights, "weights", data.get("weights", {}))}
        try:
            sections["generation"] = section(GenerationSettings, "generation", data.get("generation", {}))
        except (TypeError, ValueError) as error:
            raise ConfigError(str(error)) from error
        if data.get("surrogate") is not None:
            sections["surrogate"] = section(ModelSpec, "surrogate", data["surrogate"])
        return cls(**{**data, **sections})

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain data; `from_dict` reads it back."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class NightlySuite:
    """A nightly benchmark suite (see jobs/configs/nightly_demo.yaml): one certification `run` (everything of
    a run config but the model) for every entry of `models` ({label, model}), the same seed for all, written
    under `output`/nightly/<date>/, with the regression test's levels."""

    run: dict[str, Any]
    models: list[dict[str, Any]]
    output: str = "runs"
    storage: Storage = field(default_factory=Storage)
    seed: int = 0
    radii: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5])
    price_per_device_hour: float = 0.0
    accuracy_alpha: float = 0.001
    throughput_tolerance: float = 0.3

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NightlySuite:
        """The suite, with every model's run config validated up front (ConfigError naming the entry)."""
        _require_known(cls, data, "unknown nightly suite key(s)")
        _require(isinstance(data.get("run"), dict), "run: give the certification settings shared by every model")
        models = data.get("models")
        _require(isinstance(models, list) and bool(models) and all(
            isinstance(entry, dict) and set(entry) == {"label", "model"} for entry in models),
            "models: give a non-empty list of {label, model} entries")
        for position, entry in enumerate(models):
            _require_name(entry["label"], f"models[{position}].label", "a run of the night")
        suite = cls(**{**data, "storage": section(Storage, "storage", data.get("storage", {}))})
        for position, entry in enumerate(suite.models):
            try:
                suite.run_config(entry, suite.output)
            except ConfigError as error:
                raise ConfigError(f"models[{position}] ({entry['label']}): {error}") from error
        return suite

    def run_config(self, entry: dict[str, Any], output: str) -> RunConfig:
        """The certification run of one model of the suite, written under `output`."""
        return validate({**self.run, "model": entry["model"], "run_id": str(entry["label"]), "output": output,
                         "storage": self.storage, "seed": self.seed})


@dataclass(frozen=True)
class SweepConfig:
    """A sweep campaign over denoiser training (see jobs/configs/sweep_demo.yaml and
    `pipeline.distributed.tune`): the base `train` config, the `search` space over its dotted keys, the
    `objective` measured every epoch by a cheap Cohen `certification` of the validation split, the
    scheduler and search algorithm, resources per trial, where the sweep is written (`output`, with
    `storage`), and the `final` certification of the best trial."""

    train: dict[str, Any]
    search: dict[str, dict[str, Any]]
    objective: dict[str, Any]
    name: str = "sweep"
    output: str = "runs/sweeps"
    storage: Storage = field(default_factory=Storage)
    certification: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    search_algorithm: str = "random"
    num_samples: int = 4
    resources: dict[str, Any] = field(default_factory=dict)
    max_concurrent: int | None = None
    final_certify: bool = False
    final: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "certification", {"n0": 20, "n": 100, "alpha": 0.001, **self.certification})
        object.__setattr__(self, "scheduler", {"name": "asha", **self.scheduler})
        object.__setattr__(self, "resources", {"cpu": 1, "gpu": 0, **self.resources})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepConfig:
        """The sweep from YAML data; ConfigError naming the first bad key."""
        _require_known(cls, data, "unknown sweep key(s)")
        _require(not isinstance(data.get("storage"), str),
                 "storage: the sweep's folder is `output`; `storage` holds the object storage options, "
                 "e.g. {endpoint_url: ...}")
        _require(isinstance(data.get("train"), dict), "train: give the base denoiser training config (a path or a "
                                                      "mapping)")
        sweep = cls(**{**data, "storage": section(Storage, "storage", data.get("storage", {}))})
        sweep.check()
        return sweep

    def check(self) -> None:
        _require_name(self.name, "name", "the sweep's folder")
        _require(bool(self.search), "search: the search space is empty; name at least one hyperparameter, e.g. "
                                    "{lr: {loguniform: [1e-4, 1e-2]}}")
        for key, spec in self.search.items():
            _require(isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS,
                     f"search.{key}: give one of {list(DISTRIBUTIONS)}, e.g. {{choice: [0.25, 0.5]}}")
        metric = self.objective.get("metric")
        _require(metric in SWEEP_METRICS, f"objective.metric must be one of {list(SWEEP_METRICS)}, got {metric!r}")
        if metric == "certified_accuracy":
            self._check_radius()
        _require(self.scheduler["name"] in ("asha", "fifo"),
                 f"scheduler.name must be 'asha' or 'fifo', got {self.scheduler['name']!r}")
        _require(self.search_algorithm in ("grid", "random", "optuna"),
                 f"search_algorithm must be grid, random or optuna, got {self.search_algorithm!r}")
        _require(_is_count(self.num_samples, 1), f"num_samples must be an integer >= 1, got {self.num_samples!r}")
        _require(self.max_concurrent is None or _is_count(self.max_concurrent, 1),
                 f"max_concurrent must be an integer >= 1 or null, got {self.max_concurrent!r}")
        for key, value in self.resources.items():
            _require(_is_number(value) and value >= 0, f"resources.{key} must be a number >= 0, got {value!r}")
        DenoiserConfig.from_dict(self.train)

    def _check_radius(self) -> None:
        radius, certification = self.objective.get("radius"), self.certification
        _require(isinstance(radius, int | float) and radius >= 0, f"objective.radius must be a number >= 0, "
                                                                  f"got {radius!r}")
        sigmas = list(next(iter(self.search["sigma"].values()))) if "sigma" in self.search else [
            self.train.get("sigma", 0.25)]
        reach = max_radius(max(sigmas), certification["n"], certification["alpha"])
        _require(radius < reach, f"objective.radius={radius} cannot be certified: with n={certification['n']} and "
                                 f"alpha={certification['alpha']} the largest radius is {reach:.3f} (at sigma "
                                 f"{max(sigmas)}); raise certification.n or lower the radius")

    @property
    def metric(self) -> str:
        """The name of the objective in the trials' reports."""
        radius = self.objective.get("radius")
        return f"certified_accuracy@{radius:g}" if self.objective["metric"] == "certified_accuracy" else "acr"


def load_sweep(path: str | Path, overrides: list[str] = ()) -> SweepConfig:
    """The sweep from YAML, with `key=value` overrides applied after a `train` path is read (so
    `train.epochs=3` reaches the training config)."""
    data = read_yaml(path)
    if isinstance(data.get("train"), str):  # a path, relative to the working directory
        data["train"] = read_yaml(data["train"])
    return SweepConfig.from_dict(apply_overrides(data, overrides))
