"""Run configuration: YAML in, a validated `RunConfig` out, with errors that name the bad key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.certifiers import REGISTRY, Certifier
from pipeline.engine import PRECISIONS

DATASETS = ("demo",)
MODELS = ("demo_cnn",)

__all__ = ["ConfigError", "RunConfig", "load_config"]


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key."""


@dataclass(frozen=True)
class RunConfig:
    """Everything a certification run needs. See `jobs/configs/demo.yaml` for an annotated example."""

    certifiers: list[dict[str, Any]]
    dataset: dict[str, Any] = field(default_factory=lambda: {"name": "demo", "split": "test"})
    model: dict[str, Any] = field(default_factory=lambda: {"name": "demo_cnn"})
    run_id: str = "demo"
    output: str = "runs"
    seed: int = 0
    batch_size: int = 1000
    device: str = "cpu"
    precision: str = "fp32"

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
        return built


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    """data[a][b][c] = value for "a.b.c"; a number indexes a list (certifiers.0.sigma)."""
    *path, last = [int(key) if key.isdigit() else key for key in dotted.split(".")]
    target = data
    for key in path:
        target = target[key] if isinstance(key, int) else target.setdefault(key, {})
    target[last] = value


def load_config(path: str | Path | None = None, overrides: list[str] = (), **values: Any) -> RunConfig:
    """Reads YAML from `path`, applies `key=value` overrides (dotted keys, YAML values), then `values`."""
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
            _set_dotted(data, key.strip(), yaml.safe_load(text))
        except (IndexError, AttributeError, TypeError) as error:
            raise ConfigError(f"--set {override!r}: no such place in the config") from error
    data.update({key: value for key, value in values.items() if value is not None})
    return validate(data)


def validate(data: dict[str, Any]) -> RunConfig:
    """A RunConfig from a mapping, or ConfigError naming the first bad key."""
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; known: {sorted(known)}")
    if not isinstance(data.get("certifiers"), list) or not data["certifiers"]:
        raise ConfigError("certifiers: give a non-empty list, e.g. [{name: cohen, sigma: 0.25}]")
    if not all(isinstance(entry, dict) for entry in data["certifiers"]):
        raise ConfigError("certifiers: every entry must be a mapping with a 'name'")
    config = RunConfig(**data)
    if config.dataset.get("name") not in DATASETS:
        raise ConfigError(f"dataset.name: unknown dataset {config.dataset.get('name')!r}; known: {list(DATASETS)}")
    if config.model.get("name") not in MODELS:
        raise ConfigError(f"model.name: unknown model {config.model.get('name')!r}; known: {list(MODELS)}")
    if not isinstance(config.batch_size, int) or config.batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {config.batch_size!r}")
    if not isinstance(config.seed, int):
        raise ConfigError(f"seed must be an integer, got {config.seed!r}")
    if config.precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {sorted(PRECISIONS)}, got {config.precision!r}")
    config.build_certifiers()
    return config
