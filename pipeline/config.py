"""Run configuration: YAML in, a validated `RunConfig` out, with errors that name the bad key.

See `jobs/configs/demo.yaml` (annotated) and `jobs/configs/imagenet.yaml` (the papers' setting).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.certifiers import REGISTRY, Certifier
from pipeline.data.preprocess import Transform
from pipeline.data.sources import LAYOUTS
from pipeline.engine import PRECISIONS
from pipeline.models import model_names

DEVICES = ("auto", "cpu", "cuda")
DATASET_KEYS = {"layout", "root", "split", "skip", "max", "size", "resize", "channels", "mode", "ground_truth",
                "meta", "synsets", "id"}
MODEL_KEYS = {"name", "weights", "mean", "std", "num_classes", "denoiser"}

__all__ = ["ConfigError", "RunConfig", "load_config", "read_yaml", "set_dotted", "validate"]


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key."""


@dataclass(frozen=True)
class RunConfig:
    """Everything a certification run needs."""

    certifiers: list[dict[str, Any]]
    dataset: dict[str, Any] = field(default_factory=lambda: {"layout": "demo"})
    model: dict[str, Any] = field(default_factory=lambda: {"name": "demo_cnn"})
    run_id: str = "demo"
    output: str = "runs"
    storage: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    batch_size: int = 1000
    images_per_batch: int = 16
    device: str = "auto"
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool | str = False
    actors: dict[str, Any] = field(default_factory=lambda: {"count": 1, "gpus": 0, "cpus": 1})
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

    def transform(self) -> Transform:
        data = self.dataset
        size = data.get("size", 32 if data.get("layout") == "demo" else None)
        return Transform(size=size, resize=data.get("resize"), channels=data.get("channels", 3),
                         mode=data.get("mode", "RGB"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """data[a][b][c] = value for "a.b.c"; a number indexes a list (certifiers.0.sigma)."""
    *path, last = [int(key) if key.isdigit() else key for key in dotted.split(".")]
    target = data
    for key in path:
        target = target[key] if isinstance(key, int) else target.setdefault(key, {})
    target[last] = value


def read_yaml(path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:
    """A YAML mapping from `path` (empty without one), with `key=value` overrides applied (dotted keys, a
    number indexing a list, YAML values); ConfigError naming the file or the override."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as error:
            raise ConfigError(f"cannot read config file {path}: {error.strerror}") from error
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from error
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    for override in overrides:
        key, separator, text = override.partition("=")
        if not separator or not key:
            raise ConfigError(f"--set expects key=value, got {override!r}")
        try:
            set_dotted(data, key.strip(), yaml.safe_load(text))
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


def _is_count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def validate(data: dict[str, Any]) -> RunConfig:
    """A RunConfig from a mapping, or ConfigError naming the first bad key."""
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(data) - known)
    _require(not unknown, f"unknown config key(s) {unknown}; known: {sorted(known)}")
    _require(isinstance(data.get("certifiers"), list) and bool(data["certifiers"]),
             "certifiers: give a non-empty list, e.g. [{name: cohen, sigma: 0.25}]")
    _require(all(isinstance(entry, dict) for entry in data["certifiers"]),
             "certifiers: every entry must be a mapping with a 'name'")
    for key in ("dataset", "model", "storage", "actors"):
        _require(isinstance(data.get(key, {}), dict), f"{key}: must be a mapping")
    config = RunConfig(**data)

    dataset, model = config.dataset, config.model
    _require(not (set(dataset) - DATASET_KEYS), f"dataset: unknown key(s) {sorted(set(dataset) - DATASET_KEYS)}")
    _require(dataset.get("layout") in LAYOUTS,
             f"dataset.layout: unknown layout {dataset.get('layout')!r}; known: {list(LAYOUTS)}")
    _require(dataset.get("layout") == "demo" or bool(dataset.get("root")),
             f"dataset.root: the {dataset.get('layout')} layout needs a root path or s3:// URI")
    _require(dataset.get("id", "name") in ("name", "relative_path"),
             f"dataset.id must be 'name' or 'relative_path', got {dataset.get('id')!r}")
    _require(_is_count(dataset.get("skip", 1), 1), f"dataset.skip must be an integer >= 1, got {dataset.get('skip')!r}")
    _require(dataset.get("max") is None or _is_count(dataset["max"], 1),
             f"dataset.max must be an integer >= 1 or null, got {dataset.get('max')!r}")
    transform = config.transform()
    _require(_is_count(transform.size, 1), f"dataset.size (the centre-crop side) must be an integer >= 1, "
                                           f"got {transform.size!r}")
    _require(transform.resize is None or _is_count(transform.resize, transform.size),
             f"dataset.resize must be an integer >= dataset.size, got {transform.resize!r}")
    _require(_is_count(transform.channels, 1), f"dataset.channels must be an integer >= 1, got {transform.channels!r}")

    _require(not (set(model) - MODEL_KEYS), f"model: unknown key(s) {sorted(set(model) - MODEL_KEYS)}")
    _require(model.get("name") in model_names(),
             f"model.name: unknown model {model.get('name')!r}; use demo_cnn or a torchvision classifier name")

    _require(isinstance(config.run_id, str) and bool(re.fullmatch(r"[A-Za-z0-9._-]+", config.run_id)),
             f"run_id must be letters, digits, '.', '_' or '-', got {config.run_id!r}")
    _require(isinstance(config.output, str) and bool(config.output), "output: give a directory or s3:// URI")
    _require(_is_count(config.batch_size, 1), f"batch_size must be an integer >= 1, got {config.batch_size!r}")
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
    actors = {"count": 1, "gpus": 0, "cpus": 1, **config.actors}
    _require(not (set(actors) - {"count", "gpus", "cpus"}),
             f"actors: unknown key(s) {sorted(set(actors) - {'count', 'gpus', 'cpus'})}")
    _require(_is_count(actors["count"], 1), f"actors.count must be an integer >= 1, got {actors['count']!r}")
    for key in ("gpus", "cpus"):
        _require(isinstance(actors[key], int | float) and actors[key] >= 0,
                 f"actors.{key} must be a number >= 0, got {actors[key]!r}")
    _require(config.report_radii is None or (isinstance(config.report_radii, list) and
                                             all(isinstance(r, int | float) and r >= 0 for r in config.report_radii)),
             f"report_radii must be a list of radii >= 0, got {config.report_radii!r}")
    config.build_certifiers()
    return dataclasses.replace(config, actors=actors)
