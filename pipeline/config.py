"""Configurations: YAML in, validated typed configs out, with one error type (ConfigError) naming every bad key.

Each section states its own rules on its type (`pipeline.sections.Section`, pydantic): `DatasetSpec` in
`pipeline.data.sources`, `ModelSpec` in `pipeline.models`, `Storage` in `pipeline.storage`, the denoiser
training's `DenoiserConfig` in `pipeline.denoise.config`. This module holds the configs built from them:

- `RunConfig`: a certification run (`jobs/configs/demo.yaml`, annotated; `jobs/configs/imagenet.yaml`, the
  papers' setting), its certifiers built once from their settings;
- `NightlySuite`: the nightly benchmark (`jobs/configs/nightly_demo.yaml`);

and YAML reading, `--set` overrides and `schema()`, the JSON schema of a run config. Every default is stated
once, on its field.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    Field,
    PlainSerializer,
    PlainValidator,
    PrivateAttr,
    TypeAdapter,
    WithJsonSchema,
    model_validator,
)

from pipeline.certifiers import REGISTRY, Certifier
from pipeline.data.sources import DatasetSpec
from pipeline.denoise.config import OBJECTIVES, DenoiserConfig, LossWeights, Subset
from pipeline.engine import PRECISIONS
from pipeline.models import ModelSpec
from pipeline.sections import ConfigError, Count, Listed, Name, Number, Section, whole
from pipeline.storage import Storage

DEVICES = ("auto", "cpu", "cuda")
PRECISION_NAMES = tuple(PRECISIONS)

__all__ = ["OBJECTIVES", "Actors", "ConfigError", "DenoiserConfig", "LossWeights", "NightlySuite", "NonNegative",
           "RunConfig", "Subset", "apply_overrides", "load_config", "parse_yaml", "read_yaml", "schema", "set_dotted",
           "validate"]

NonNegative = Annotated[Number, Field(ge=0.0)]


class Actors(Section):
    """The certification actor pool: `count` actors (auto: one per `gpus` of the cluster's GPUs when it has
    GPUs, else one), each with `gpus` GPUs (fractions allowed) and `cpus` (its torch threads; a GPU actor
    reserves the one CPU Ray gives GPU work)."""

    count: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    gpus: NonNegative = 0
    cpus: NonNegative = 1


def _certifier(entry: Any) -> Certifier:
    """One certifier built from its settings ({name, ...}); ValueError naming the setting. A run's images are
    decoded to 8 bits (`pipeline.data.preprocess`), so they are on the 1/255 grid: a Gaussian certifier's
    `gaussian: auto` is resolved here to the sound noise."""
    if isinstance(entry, Certifier):
        return entry.for_inputs(on_grid=True)
    if not isinstance(entry, dict):
        raise ValueError("{where}: every entry must be a mapping with a 'name'")
    settings = dict(entry)
    name = settings.pop("name", None)
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"{{where}}.name: unknown certifier {name!r}; known: {sorted(REGISTRY)}")
    known = {field.name for field in dataclasses.fields(REGISTRY[name])}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"{{where}}: unknown setting(s) {unknown} for {name!r}; known: {sorted(known)}")
    try:
        return REGISTRY[name](**settings).for_inputs(on_grid=True)
    except TypeError as error:
        raise ValueError(f"{name}: {error}") from error


def _settings(certifier: Certifier) -> dict[str, Any]:
    return {"name": certifier.name, **dataclasses.asdict(certifier)}


def _certifier_schema() -> dict[str, Any]:
    """One JSON schema per registered certifier, told apart by `name`."""
    choices = []
    for name, kind in REGISTRY.items():
        own = TypeAdapter(kind).json_schema()
        choices.append({**own, "title": name, "properties": {"name": {"const": name}, **own["properties"]},
                        "required": ["name", *own.get("required", [])], "additionalProperties": False})
    return {"oneOf": choices}


BuiltCertifier = Annotated[Certifier, PlainValidator(_certifier), PlainSerializer(_settings),
                           WithJsonSchema(_certifier_schema())]


def _batch_size(value: Any) -> int | str:
    value = value if isinstance(value, str) else whole(value)
    if value != "auto" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"{{where}} must be 'auto' or an integer >= 1, got {value!r}")
    return value


def _non_empty(certifiers: tuple) -> tuple:
    if not certifiers:
        raise ValueError("{where}: give a non-empty list, e.g. [{name: cohen, sigma: 0.25}]")
    return certifiers


def _compile(value: Any) -> bool | str:
    if not isinstance(value, bool | str) or value == "":
        raise ValueError(f"{{where}} must be true, false or a torch.compile backend name, got {value!r}")
    return value


class RunConfig(Section):
    """Everything a certification run needs; `certifiers` are the certifier objects, built once from their
    settings (the manifest records the settings as given: `to_dict`)."""

    unknown_keys = "unknown config key(s)"

    certifiers: Annotated[tuple[BuiltCertifier, ...], Listed, AfterValidator(_non_empty)] = Field(
        (), validate_default=True)
    dataset: DatasetSpec = DatasetSpec()
    model: ModelSpec = ModelSpec()
    run_id: Name = "demo"
    output: Annotated[str, Field(min_length=1)] = "runs"
    storage: Storage = Storage()
    seed: int = 0
    batch_size: Annotated[int | str, PlainValidator(_batch_size, json_schema_input_type=int | Literal["auto"])] = "auto"
    images_per_batch: Count = Field(16, ge=1)
    device: Literal[DEVICES] = "auto"
    precision: Literal[PRECISION_NAMES] = "fp32"
    channels_last: bool = False
    compile: Annotated[bool | str, PlainValidator(_compile, json_schema_input_type=bool | str)] = False
    actors: Actors = Actors()
    report_radii: list[NonNegative] | None = None
    _given: list[dict[str, Any]] | None = PrivateAttr(None)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_given(cls, data: Any, handler) -> RunConfig:
        """The certifier settings as given, for the manifest (so earlier manifests still match)."""
        config = handler(data)
        given = data.get("certifiers") if isinstance(data, dict) else None
        if isinstance(given, list | tuple) and all(isinstance(entry, dict) for entry in given):
            config._given = [dict(entry) for entry in given]
        return config

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        settings = [certifier.setting for certifier in self.certifiers]
        repeated = sorted({s for s in settings if settings.count(s) > 1})
        if repeated:
            raise ValueError(f"certifiers: the same setting appears twice: {repeated}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain data (YAML / JSON), the certifiers' settings as given; `validate` reads
        it back."""
        data = self.model_dump(mode="json")
        if self._given is not None:
            data["certifiers"] = [dict(entry) for entry in self._given]
        return {"certifiers": data.pop("certifiers"), **data}


def validate(data: dict[str, Any]) -> RunConfig:
    """A RunConfig from a mapping, or one ConfigError naming every bad key."""
    return RunConfig.from_dict(data)


def schema() -> dict[str, Any]:
    """The JSON schema of a run config (`pipeline config-schema`)."""
    return RunConfig.model_json_schema()


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


class ModelEntry(Section):
    """One model of a nightly suite: its `label` (a folder of the night) and its `model` section."""

    label: Name
    model: dict[str, Any]


class NightlySuite(Section):
    """A nightly benchmark suite (see jobs/configs/nightly_demo.yaml): one certification `run` (everything of
    a run config but the model) for every entry of `models` ({label, model}), the same seed for all, written
    under `output`/nightly/<date>/, with the regression test's levels. Every model's run config is valid."""

    unknown_keys = "unknown nightly suite key(s)"

    run: dict[str, Any]
    models: Annotated[list[ModelEntry], Field(min_length=1)]
    output: str = "runs"
    storage: Storage = Storage()
    seed: int = 0
    radii: list[NonNegative] = Field(default_factory=lambda: [0.0, 0.25, 0.5])
    price_per_device_hour: NonNegative = 0.0
    accuracy_alpha: Annotated[Number, Field(gt=0.0, lt=1.0)] = 0.001
    throughput_tolerance: NonNegative = 0.3

    @model_validator(mode="after")
    def _check_runs(self) -> NightlySuite:
        problems = []
        for position, entry in enumerate(self.models):
            try:
                self.run_config(entry, self.output)
            except ConfigError as error:
                problems.append(f"models[{position}] ({entry.label}): {error}")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def run_config(self, entry: ModelEntry, output: str) -> RunConfig:
        """The certification run of one model of the suite, written under `output`."""
        return validate({**self.run, "model": entry.model, "run_id": entry.label, "output": output,
                         "storage": self.storage, "seed": self.seed})
