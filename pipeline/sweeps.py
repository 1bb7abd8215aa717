"""A sweep's definition (`SweepConfig`, `load_sweep`, each section typed with its rules) and its own
record, so an interrupted sweep resumes into exactly the experiment it started, or refuses.

The trials of a grid or random search are drawn here, once, from the search space and the base config's seed
(`plan_trials`), and written with a digest of the sweep's definition to `<output>/<name>/sweep.json` before
any trial runs. Each trial trains resumably into `trials/<key>/` (`pipeline.denoise.train.fit_resumable`:
the last epoch's artifact, `last.json` with the digests of its files and every epoch's metrics, `best/`),
and the driver records each trial's end in sweep.json; every write is atomic. A resume reads only these
JSON files and artifacts whose digests match (weights with `weights_only=True`), never a pickle of the
sweep runner's: a folder this project did not write for this very sweep is refused before anything in it
is loaded, naming the file and what to do.

The sweep's objective (`trial_objective`: a cheap Cohen certification of the held-out validation split) and
its outputs (`write_outputs`: the trial table, the objective plot and the best trial's configs) are here too;
`pipeline.distributed.tune` only runs the trials on Ray Tune.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
import yaml
from pydantic import AfterValidator, BeforeValidator, Field, PlainValidator, model_validator

from pipeline import plots
from pipeline.certification import certify
from pipeline.certifiers import Cohen
from pipeline.certifiers.cohen import max_radius
from pipeline.config import ConfigError, DenoiserConfig, NonNegative, apply_overrides, read_yaml, set_dotted
from pipeline.denoise.train import TrainingData, training_record
from pipeline.models.denoisers import Denoised
from pipeline.report import accuracy_at, acr
from pipeline.sections import Count, Name, Number, Section
from pipeline.storage import Storage

log = logging.getLogger(__name__)

__all__ = ["BEST_FILES", "FORMAT", "SweepConfig", "SweepFailed", "SweepInterrupted", "SweepRecord", "SweepRefused",
           "best_certify_config", "best_trial", "finished_scores", "load_sweep", "plan_trials", "remove_best",
           "sweep_digest", "sweep_metrics", "trial_config", "trial_objective", "trial_table", "write_outputs"]

FORMAT = "pipeline-sweep/1"
SWEEP_METRICS = ("certified_accuracy", "acr")
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform")


class Objective(Section):
    """What a sweep maximises: `certified_accuracy` at `radius`, or `acr`."""

    metric: Literal[SWEEP_METRICS]
    radius: NonNegative | None = None

    @model_validator(mode="after")
    def _radius(self) -> Objective:
        if self.metric == "certified_accuracy" and self.radius is None:
            raise ValueError("{where}.radius must be a number >= 0, got None")
        return self


class Certification(Section):
    """The cheap Cohen certification of the validation split that measures the objective every epoch."""

    n0: Count = Field(20, ge=1)
    n: Count = Field(100, ge=1)
    alpha: Annotated[Number, Field(gt=0.0, lt=1.0)] = 0.001


class Scheduler(Section):
    """Tune's trial scheduler: ASHA over epochs (`max_t`: the training's epochs by default) or FIFO."""

    name: Literal["asha", "fifo"] = "asha"
    max_t: Count | None = Field(None, ge=1)
    grace_period: Count | None = Field(None, ge=1)
    reduction_factor: Count | None = Field(None, ge=2)


class Resources(Section):
    """Resources per trial (fractional GPUs allowed)."""

    cpu: NonNegative = 1
    gpu: NonNegative = 0


def _distribution(spec: Any) -> dict[str, Any]:
    """One searched key's distribution, checked: grid and choice a non-empty list; uniform and loguniform two
    finite numbers low < high (loguniform: low > 0)."""
    if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
        raise ValueError(f"{{where}}: give one of {list(DISTRIBUTIONS)}, e.g. {{choice: [0.25, 0.5]}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if kind in ("grid", "choice"):
        if not isinstance(values, list | tuple) or not values:
            raise ValueError(f"{{where}}.{kind} must be a non-empty list of values, e.g. {{{kind}: [0.25, 0.5]}}, "
                             f"got {values!r}")
        return spec
    if not (isinstance(values, list | tuple) and len(values) == 2 and all(_finite(value) for value in values)):
        raise ValueError(f"{{where}}.{kind} must be two finite numbers [low, high], e.g. {{{kind}: [0.0001, 0.01]}}, "
                         f"got {values!r}")
    low, high = values
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"{{where}}.loguniform needs low > 0 (it samples the logarithm), got {list(values)!r}")
    if low >= high:
        raise ValueError(f"{{where}}.{kind} needs low < high, got {list(values)!r}")
    return spec


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _training(train: dict[str, Any]) -> dict[str, Any]:
    try:
        DenoiserConfig.from_dict(train)
    except ConfigError as error:
        raise ValueError(f"{{where}}: {error}") from None
    return train


def _storage_options(value: Any) -> Any:
    if isinstance(value, str):
        raise ValueError("{where}: the sweep's folder is `output`; `storage` holds the object storage options, "
                         "e.g. {endpoint_url: ...}")
    return value


class SweepConfig(Section):
    """A sweep campaign over denoiser training (see jobs/configs/sweep_demo.yaml and
    `pipeline.distributed.tune`): the base `train` config, the `search` space over its dotted keys, the
    `objective` measured every epoch by a cheap Cohen `certification` of the validation split, the
    scheduler and search algorithm, resources per trial, where the sweep is written (`output`, with
    `storage`), and the `final` certification of the best trial."""

    unknown_keys = "unknown sweep key(s)"

    train: Annotated[dict[str, Any], AfterValidator(_training)]
    search: dict[str, Annotated[dict[str, Any], PlainValidator(_distribution)]]
    objective: Objective
    name: Name = "sweep"
    output: str = "runs/sweeps"
    storage: Annotated[Storage, BeforeValidator(_storage_options)] = Storage()
    certification: Certification = Certification()
    scheduler: Scheduler = Scheduler()
    search_algorithm: Literal["grid", "random", "optuna"] = "random"
    num_samples: Count = Field(4, ge=1)
    resources: Resources = Resources()
    max_concurrent: Count | None = Field(None, ge=1)
    final_certify: bool = False
    final: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        if not self.search:
            raise ValueError("search: the search space is empty; name at least one hyperparameter, e.g. "
                             "{lr: {loguniform: [1e-4, 1e-2]}}")
        if self.objective.metric == "certified_accuracy":
            self._check_radius()
        return self

    def _check_radius(self) -> None:
        radius, certification = self.objective.radius, self.certification
        sigmas = list(next(iter(self.search["sigma"].values()))) if "sigma" in self.search else [
            self.train.get("sigma", 0.25)]
        if not all(_finite(sigma) and sigma > 0 for sigma in sigmas):
            raise ValueError(f"search.sigma: every sigma must be a number > 0, got {sigmas!r}")
        reach = max_radius(max(sigmas), certification.n, certification.alpha)
        if radius >= reach:
            raise ValueError(f"objective.radius={radius} cannot be certified: with n={certification.n} and "
                             f"alpha={certification.alpha} the largest radius is {reach:.3f} (at sigma "
                             f"{max(sigmas)}); raise certification.n or lower the radius")

    @property
    def metric(self) -> str:
        """The name of the objective in the trials' reports."""
        radius = self.objective.radius
        return f"certified_accuracy@{radius:g}" if self.objective.metric == "certified_accuracy" else "acr"

    def definition(self) -> dict[str, Any]:
        """What defines the experiment (not where or how wide it runs): the base config, the search space, the
        objective, its certification, the scheduler, the search algorithm and the number of samples; the
        sections as plain data, as they were recorded before they were typed (for the sweep's digest)."""
        return {"train": self.train, "search": self.search, "objective": self.objective.model_dump(exclude_none=True),
                "certification": self.certification.model_dump(), "scheduler": self.scheduler.model_dump(
                    exclude_none=True), "search_algorithm": self.search_algorithm, "num_samples": self.num_samples}


def load_sweep(path: str | Path, overrides: list[str] = ()) -> SweepConfig:
    """The sweep from YAML, with `key=value` overrides applied after a `train` path is read (so
    `train.epochs=3` reaches the training config)."""
    data = read_yaml(path)
    if isinstance(data.get("train"), str):  # a path, relative to the working directory
        data["train"] = read_yaml(data["train"])
    return SweepConfig.from_dict(apply_overrides(data, overrides))


class SweepRefused(ValueError):
    """A sweep folder that cannot be resumed as this sweep; the message names the file and the way out."""


class SweepFailed(RuntimeError):
    """A sweep with no finished trial that reported its objective (every trial failed, or none finished an
    epoch)."""


class SweepInterrupted(RuntimeError):
    """A sweep stopped before every planned trial ended (Ctrl-C, SIGTERM): no best configs were written; the
    message says how many trials are finished and that rerunning the same command resumes. `exit_code`: 130
    after Ctrl-C (SIGINT), 143 after SIGTERM."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


def definition(sweep: SweepConfig) -> dict:
    """What defines the experiment (`SweepConfig.definition`), as JSON data."""
    return json.loads(json.dumps(sweep.definition(), sort_keys=True, default=str))


def sweep_digest(sweep: SweepConfig) -> str:
    """sha256 of the sweep's `definition`."""
    return hashlib.sha256(json.dumps(definition(sweep), sort_keys=True).encode()).hexdigest()


def _is_grid(kind: str, algorithm: str) -> bool:
    return kind == "grid" or (algorithm == "grid" and kind == "choice")


def _draw(kind: str, values: list, rng: np.random.Generator):
    if kind == "choice":
        return values[int(rng.integers(len(values)))]
    if kind == "uniform":
        return float(rng.uniform(*values))
    return float(math.exp(rng.uniform(math.log(values[0]), math.log(values[1]))))


def plan_trials(sweep: SweepConfig) -> dict[str, dict]:
    """The trials of a grid or random search, in order: for each of `num_samples` (1 for `grid`) the cross
    product of the grid keys, with the other keys drawn from their distributions by a generator seeded with the
    base config's seed. Keys are `t000`, `t001`, ... The same sweep always gets the same plan."""
    algorithm = sweep.search_algorithm
    specs = {key: next(iter(spec.items())) for key, spec in sweep.search.items()}
    grid = [key for key, (kind, _) in specs.items() if _is_grid(kind, algorithm)]
    rng = np.random.default_rng(DenoiserConfig.from_dict(sweep.train).seed)
    trials = []
    for _ in range(1 if algorithm == "grid" else sweep.num_samples):
        for point in itertools.product(*(list(specs[key][1]) for key in grid)):
            fixed = dict(zip(grid, point, strict=True))
            trials.append({key: fixed[key] if key in fixed else _draw(*specs[key], rng) for key in specs})
    return {f"t{index:03d}": trial for index, trial in enumerate(trials)}


class SweepRecord:
    """sweep.json: the format, the sweep's definition and its digest, and every trial's sampled config,
    status (`pending`, `finished` or `error`) and error; `attempts` counts the runs of the sweep."""

    def __init__(self, location, data: dict):
        self.location, self.data = location, data

    @property
    def trials(self) -> dict[str, dict]:
        return self.data["trials"]

    @classmethod
    def open(cls, sweep: SweepConfig, location) -> SweepRecord:
        """The record of this sweep at `location`: created (with its plan) in an empty or new folder, else read
        and checked. SweepRefused when the folder holds files but no sweep.json, when sweep.json is not this
        project's or is damaged, when it records another sweep, or for an unfinished Optuna sweep (its
        sampler's state is not kept)."""
        path = location.join("sweep.json")
        if not path.exists():
            if any(not entry.base_name.endswith(".partial") for entry in location.entries()):  # not a torn write
                raise SweepRefused(f"{location.uri} holds files but no sweep.json, so this project did not write "
                                   f"it as a sweep; nothing in it was read. Choose another sweep name or remove "
                                   f"the folder")
            plan = {} if sweep.search_algorithm == "optuna" else plan_trials(sweep)
            record = cls(location, {"format": FORMAT, "digest": sweep_digest(sweep), "definition": definition(sweep),
                                    "attempts": 1,
                                    "trials": {key: {"config": config, "status": "pending", "error": None}
                                               for key, config in plan.items()}})
            record.save()
            return record
        record = cls(location, _read(location))
        if not record.trials and record.data.get("definition", {}).get("search_algorithm") != "optuna":
            raise SweepRefused(f"{path.uri} plans no trial (an earlier version wrote it for an empty search space); "
                               f"remove {location.uri} to start over")
        if record.data["digest"] != sweep_digest(sweep):
            raise SweepRefused(f"{path.uri} records another sweep (its definition differs from this config's); "
                               f"choose another sweep name, or remove {location.uri} to start over")
        if sweep.search_algorithm == "optuna" and record.unfinished():
            raise SweepRefused(f"{path.uri}: an interrupted Optuna sweep cannot be resumed exactly (the sampler's "
                               f"state is not kept); its finished trials are under {location.uri}/trials. Start "
                               f"it under another name")
        record.data["attempts"] += 1
        record.save()
        return record

    def unfinished(self) -> list[str]:
        """Keys of the trials still to run: pending ones and those that failed (retried from their last
        epoch)."""
        return [key for key, trial in self.trials.items() if trial["status"] != "finished"]

    def retry(self, keys: list[str]) -> None:
        """Marks the errored trials among `keys` pending again before an attempt runs them (their last error
        kept until they end), so a record never calls a trial ended that an interrupted attempt did not run."""
        errored = [key for key in keys if self.trials[key]["status"] == "error"]
        for key in errored:
            self.trials[key]["status"] = "pending"
        if errored:
            self.save()

    def counts(self, sweep: SweepConfig) -> tuple[int, int, int]:
        """(finished, errored, planned): planned is the record's trials, or for Optuna (whose trials are
        recorded as they start) at least `num_samples`."""
        statuses = [trial["status"] for trial in self.trials.values()]
        planned = max(len(statuses), sweep.num_samples) if sweep.search_algorithm == "optuna" else len(statuses)
        return statuses.count("finished"), statuses.count("error"), planned

    def add(self, key: str, config: dict) -> None:
        self.trials.setdefault(key, {"config": config, "status": "pending", "error": None})
        self.save()

    def mark(self, key: str, status: str, error: str | None = None) -> None:
        self.trials[key].update(status=status, error=error)
        self.save()

    def save(self) -> None:
        self.location.write_json("sweep.json", self.data)


def _read(location) -> dict:
    uri = location.join("sweep.json").uri
    try:
        data = location.read_json("sweep.json")
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"its format is not {FORMAT}")
        if not isinstance(data.get("trials"), dict) or not isinstance(data.get("digest"), str):
            raise ValueError("it lacks the trials or the digest")
    except (ValueError, UnicodeDecodeError) as error:
        raise SweepRefused(f"{uri} is damaged or not this project's sweep record ({error}); nothing else in the "
                           f"folder was read. Remove {location.uri} to start over") from error
    return data


def trial_config(sweep: SweepConfig, sampled: dict) -> dict:
    """The training config of one trial: the base with the sampled values at their dotted keys."""
    train = copy.deepcopy(sweep.train)
    for key, value in sampled.items():
        set_dotted(train, key, value)
    return train


def sweep_metrics(table: pa.Table, radius: float) -> dict[str, float]:
    """Both objectives on a certification's rows: certified accuracy at `radius` and ACR."""
    rows = table.to_pandas()
    return {f"certified_accuracy@{radius:g}": accuracy_at(rows, [radius])[0], "acr": acr(rows)}


def trial_table(sweep: SweepConfig, record: SweepRecord, epochs: int) -> pd.DataFrame:
    """One row per trial from the record and each trial's own last.json: its config, the best objective and
    validation accuracy over its epochs, epochs run, whether the scheduler stopped it early, its status and
    error, and its best artifact. The same on every resume of the same sweep."""
    rows = []
    for key, trial in record.trials.items():
        folder = record.location.join("trials", key)
        history = pd.DataFrame((training_record(folder) or {"history": []})["history"])
        best = folder.join("best")
        rows.append({"trial_id": key, "config": yaml.safe_dump(trial["config"]),
                     **{f"config.{name}": trial["config"].get(name) for name in sweep.search},
                     sweep.metric: float(history[sweep.metric].max()) if sweep.metric in history else math.nan,
                     "val_accuracy": float(history["val_accuracy"].max()) if "val_accuracy" in history else math.nan,
                     "epochs_run": len(history),
                     "stopped_early": trial["status"] == "finished" and 0 < len(history) < epochs,
                     "status": trial["status"], "error": trial["error"],
                     "checkpoint": best.uri if best.join("artifact.json").exists() else None})
    return pd.DataFrame(rows)


def finished_scores(sweep: SweepConfig, record: SweepRecord) -> dict[str, float]:
    """The best objective of each finished trial of the record, from its own last.json (as `trial_table`)."""
    scores = {}
    for key, trial in record.trials.items():
        if trial["status"] == "finished":
            history = (training_record(record.location.join("trials", key)) or {"history": []})["history"]
            values = [epoch[sweep.metric] for epoch in history if sweep.metric in epoch]
            scores[key] = max(values) if values else math.nan
    return scores


def trial_objective(sweep: SweepConfig, train: DenoiserConfig) -> Callable[[torch.nn.Module, TrainingData], dict]:
    """A trial's metrics after an epoch: its denoiser in front of the frozen classifier, certified on the
    validation split by Cohen at the trial's sigma with the sweep's `certification` (n0, n, alpha), in this
    process; both objectives (`sweep_metrics`)."""
    radius = sweep.objective.radius or 0.0

    def evaluate(denoiser: torch.nn.Module, data: TrainingData) -> dict:
        denoiser.eval()
        cohen = Cohen(sigma=train.sigma, **sweep.certification.model_dump())
        table = certify(Denoised(data.target, denoiser), data.x_val.cpu(), data.y_val.cpu(), [cohen], seed=train.seed,
                        batch_size=1000)
        return sweep_metrics(table, radius)

    return evaluate


BEST_FILES = ("best_train.yaml", "best_certify.yaml")


def best_trial(scores: dict[str, float]) -> str | None:
    """The sweep's one rule for its best trial, shared by the progress line and the outputs: the highest finite
    objective; among equal objectives the earliest trial (t002 before t010); None without a finite score."""
    finite = [(value, key) for key, value in scores.items() if isinstance(value, int | float) and math.isfinite(value)]
    if not finite:
        return None
    return min(finite, key=lambda item: (-item[0], len(item[1]), item[1]))[1]


def remove_best(location) -> None:
    """Removes best_train.yaml and best_certify.yaml, so a sweep that has trials to run shows no best until it
    ends (a later, finished attempt writes them again)."""
    for name in BEST_FILES:
        target = location.join(name)
        if target.exists():
            location.retrying(lambda path=target.path: location.fs.delete_file(path), f"removing {name} from")


def write_outputs(sweep: SweepConfig, record: SweepRecord, exit_code: int = 130) -> dict:
    """Writes the sweep's outputs beside its record: `trials.parquet` (`trial_table`) and `objective.png` (the
    objective against each searched hyperparameter); then, only when every planned trial is finished or
    errored, the best finished trial's (`best_trial`) training config as `best_train.yaml` and the
    certification of its denoiser as `best_certify.yaml`; returns that certification config.
    SweepInterrupted (with `exit_code`), after removing any earlier best configs, while trials are left to
    run; SweepFailed when no finished trial reported the objective (errored trials are never the best)."""
    location, base = record.location, DenoiserConfig.from_dict(sweep.train)
    table = trial_table(sweep, record, base.epochs + base.second_epochs)
    location.write_parquet("trials.parquet", pa.Table.from_pandas(table, preserve_index=False))
    location.write_bytes("objective.png", _plot(table, sweep.search, sweep.metric))
    finished, errored, planned = record.counts(sweep)
    if finished + errored < planned:
        remove_best(location)
        raise SweepInterrupted(f"sweep {sweep.name} interrupted: {finished} of {planned} trials finished"
                               f"{f', {errored} errored' if errored else ''}, no best configs written; rerun the "
                               f"same command to resume (see {location.uri}/trials.parquet)", exit_code)
    done = table[table["status"] == "finished"]
    key = best_trial(dict(zip(done["trial_id"], done[sweep.metric], strict=True)))
    if key is None:
        remove_best(location)
        reported = int(table[sweep.metric].notna().sum())
        raise SweepFailed(f"no finished trial of sweep {sweep.name} reported {sweep.metric} ({errored} of {planned} "
                          f"errored, {reported} reported before failing); no best configs written; see "
                          f"{location.uri}/trials.parquet")
    best = table.set_index("trial_id").loc[key]
    train = trial_config(sweep, record.trials[key]["config"])
    location.write_bytes("best_train.yaml", yaml.safe_dump(train, sort_keys=False).encode())
    certify = best_certify_config(sweep, train, best["checkpoint"])
    location.write_bytes("best_certify.yaml", yaml.safe_dump(certify, sort_keys=False).encode())
    log.info("best trial: %s %s = %.4f with %s (%d of %d trials finished, %d errored)", key, sweep.metric,
             best[sweep.metric], record.trials[key]["config"], finished, planned, errored)
    return certify


def best_certify_config(sweep: SweepConfig, train: dict, denoiser: str) -> dict:
    """The run config certifying the best trial's `denoiser` before its classifier with Cohen at its sigma:
    run id `<sweep>-best`, and what `final` sets (`output`, `dataset`, `certification`: Cohen's settings);
    the run config's own defaults for the rest."""
    final = sweep.final
    return {"run_id": f"{sweep.name}-best",
            **({"output": str(final["output"])} if "output" in final else {}),
            **({"dataset": final["dataset"]} if "dataset" in final else {}),
            "model": {**train["classifier"], "denoiser": denoiser},
            "certifiers": [{"name": "cohen", "sigma": DenoiserConfig.from_dict(train).sigma,
                            **final.get("certification", {})}],
            **({"storage": train["storage"]} if train.get("storage") else {})}


def _plot(table: pd.DataFrame, search: dict, metric: str) -> bytes:
    values = {key: pd.to_numeric(table[f"config.{key}"], errors="coerce") for key in search}
    log_scale = [key for key in search if search[key] and next(iter(search[key])) == "loguniform"]
    return plots.to_png(plots.objective_figure(values, table[metric], table["stopped_early"], metric, log_scale),
                        dpi=110)
