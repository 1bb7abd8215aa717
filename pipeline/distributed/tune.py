"""Sweep campaigns with Ray Tune over denoiser training: sigma, DE-CROP's generation settings, loss weights,
any training setting.

A sweep YAML names a base training config (`train`: a path or a mapping), a search space over dotted keys
of it (`search`: {key: {grid | choice: [...]} or {uniform | loguniform: [low, high]}}), the objective
(`objective`: certified accuracy at a radius, or ACR, measured every epoch by a cheap Cohen certification
of the held-out validation split with `certification` n0 / n / alpha), the scheduler (ASHA over epochs by
default, or FIFO), the search algorithm (grid and random built in, Optuna when installed), resources per
trial (fractional GPUs allowed) and where the sweep is written (`output`, local or s3://, with `storage`).
The sweep config is `pipeline.config.SweepConfig`; this module only wires it to Ray Tune.

Every trial reports its metrics and a checkpoint (the denoiser artifact) every epoch, so ASHA can stop
weak trials and an interrupted sweep resumes with `Tuner.restore` (finished trials are not re-run;
unfinished ones continue from their last checkpoint). At the end the sweep writes `trials.parquet`
(config, metrics, status of every trial), `objective.png` (the objective against each searched
hyperparameter), and the best configuration as `best_train.yaml` (for jobs/train_denoiser.py) and
`best_certify.yaml` (for jobs/certify.py, with the best trial's denoiser).
"""

from __future__ import annotations

import copy
import io
import logging
import math
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from ray import tune
from ray.tune.execution import class_cache
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

import pipeline
from pipeline import plots
from pipeline.certifiers import Cohen
from pipeline.config import ConfigError, DenoiserConfig, SweepConfig, set_dotted, validate
from pipeline.denoise.train import fit
from pipeline.distributed import init_ray, is_verbose, set_verbose
from pipeline.distributed.certify import run
from pipeline.distributed.progress import SweepProgress
from pipeline.models.denoisers import Denoised
from pipeline.report import accuracy_at, acr

CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")

log = logging.getLogger(__name__)

__all__ = ["run_sweep", "sweep_metrics", "trial_config"]


def keep_credentials_out_of_runtime_envs() -> None:
    """Ray Tune copies the driver's AWS credential variables into every trial's runtime env, and Ray's
    runtime-env agent writes runtime envs to its log in plain text (which the dashboard serves). Trials get
    credentials by the standard chain of the node they run on instead (its environment, profile or instance
    role), as every other Ray worker of the project does."""
    class_cache.ENV_VARS_TO_PROPAGATE.difference_update(CREDENTIALS)


def _space(search: dict, algorithm: str) -> dict:
    space = {}
    for key, spec in search.items():
        kind, values = next(iter(spec.items()))
        if kind == "grid" or (algorithm == "grid" and kind == "choice"):
            space[key] = tune.grid_search(list(values))
        elif kind == "choice":
            space[key] = tune.choice(list(values))
        elif kind == "uniform":
            space[key] = tune.uniform(*values)
        else:
            space[key] = tune.loguniform(*values)
    return space


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


def _trainable(sampled: dict, sweep: SweepConfig, verbose: bool = False) -> None:
    set_verbose(verbose)  # the trial's own process: Ray's INFO lines (each checkpoint saved) only with -v
    config = DenoiserConfig.from_dict({**trial_config(sweep, sampled), "workers": 0})
    certification, radius = sweep.certification, sweep.objective.get("radius", 0.0)

    def evaluate(denoiser, data) -> dict:
        denoiser.eval()
        table = pipeline.certify(Denoised(data.target, denoiser), data.x_val.cpu(), data.y_val.cpu(),
                                 [Cohen(sigma=config.sigma, **certification)], seed=config.seed, batch_size=1000)
        return sweep_metrics(table, radius)

    def report(metrics: dict, directory: Path | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(str(directory)) if directory is not None else None
        tune.report(metrics, checkpoint=checkpoint)

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        fit(config, report, evaluate=evaluate, every_epoch=True)
    else:
        with checkpoint.as_directory() as directory:
            fit(config, report, evaluate=evaluate, every_epoch=True, resume_from=Path(directory))


def _scheduler(sweep: SweepConfig, epochs: int):
    settings = sweep.scheduler
    if settings["name"] == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(max_t=settings.get("max_t", epochs), grace_period=settings.get("grace_period", 1),
                         reduction_factor=settings.get("reduction_factor", 2))


def _search_algorithm(sweep: SweepConfig):
    if sweep.search_algorithm != "optuna":
        return None
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as error:
        raise ConfigError("search_algorithm: optuna needs the optuna package (pip install optuna)") from error
    return OptunaSearch()


def run_sweep(sweep: SweepConfig) -> str:
    """Runs (or resumes) the sweep; writes the trial table, the plot and the best configs; returns the sweep's
    URI."""
    init_ray()
    keep_credentials_out_of_runtime_envs()
    name, metric = sweep.name, sweep.metric
    root = sweep.storage.open(sweep.output)
    location = root.join(name)
    base = DenoiserConfig.from_dict(sweep.train)
    epochs = base.epochs + base.second_epochs
    algorithm = sweep.search_algorithm
    trainable = tune.with_resources(tune.with_parameters(_trainable, sweep=sweep, verbose=is_verbose()),
                                    sweep.resources)
    if tune.Tuner.can_restore(location.path, storage_filesystem=location.fs):
        log.info("resuming sweep %s from %s", name, location.uri)
        tuner = tune.Tuner.restore(location.path, trainable, resume_unfinished=True, storage_filesystem=location.fs)
    else:
        tuner = tune.Tuner(
            trainable, param_space=_space(sweep.search, algorithm),
            tune_config=tune.TuneConfig(metric=metric, mode="max", scheduler=_scheduler(sweep, epochs),
                                        search_alg=_search_algorithm(sweep),
                                        num_samples=1 if algorithm == "grid" else sweep.num_samples,
                                        max_concurrent_trials=sweep.max_concurrent),
            run_config=tune.RunConfig(name=name, storage_path=root.path, storage_filesystem=root.fs,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                      verbose=2 if is_verbose() else 0,  # Tune's tables only with -v
                                      callbacks=[SweepProgress.of(sweep)]))
    results = tuner.fit()
    _write_outputs(sweep, results, location, metric, epochs)
    return location.uri


def _write_outputs(sweep, results, location, metric: str, epochs: int) -> None:
    rows = []
    for result in results:
        history = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
        last = result.metrics or {}
        iterations = int(last.get("training_iteration", 0))
        rows.append({"trial_id": last.get("trial_id"), "config": yaml.safe_dump(result.config),
                     **{f"config.{key}": result.config.get(key) for key in sweep.search},
                     metric: float(history[metric].max()) if metric in history else math.nan,
                     "val_accuracy": float(history["val_accuracy"].max()) if "val_accuracy" in history else math.nan,
                     "epochs_run": iterations, "stopped_early": 0 < iterations < epochs,
                     "status": "error" if result.error else "finished", "error": str(result.error or "") or None,
                     "checkpoint": _uri(location, result.checkpoint.path) if result.checkpoint else None})
    table = pd.DataFrame(rows)
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), buffer)
    location.write_bytes("trials.parquet", buffer.getvalue())
    location.write_bytes("objective.png", _plot(table, sweep.search, metric))

    best = results.get_best_result(metric=metric, mode="max", scope="all")
    train = trial_config(sweep, best.config)
    location.write_bytes("best_train.yaml", yaml.safe_dump(train, sort_keys=False).encode())
    checkpoint = best.get_best_checkpoint(metric=metric, mode="max") or best.checkpoint
    best_config, final = DenoiserConfig.from_dict(train), sweep.final
    certify = {  # Cohen's own defaults, unless `final.certification` sets them
        "run_id": f"{sweep.name}-best", "output": str(final.get("output", "runs")),
        "dataset": final.get("dataset", {"layout": "demo", "split": "test"}),
        "model": {**train["classifier"], "denoiser": _uri(location, checkpoint.path)},
        "certifiers": [{"name": "cohen", "sigma": best_config.sigma, **final.get("certification", {})}],
        **({"storage": train["storage"]} if train.get("storage") else {}),
    }
    location.write_bytes("best_certify.yaml", yaml.safe_dump(certify, sort_keys=False).encode())
    log.info("best trial: %s = %.4f with %s", metric, best.metrics.get(metric, math.nan), best.config)
    if sweep.final_certify:
        run(validate(certify))


def _uri(location, path: str) -> str:
    return f"s3://{path}" if location.is_s3 else path


def _plot(table: pd.DataFrame, search: dict, metric: str) -> bytes:
    values = {key: pd.to_numeric(table[f"config.{key}"], errors="coerce") for key in search}
    log_scale = [key for key in search if search[key] and next(iter(search[key])) == "loguniform"]
    return plots.to_png(plots.objective_figure(values, table[metric], table["stopped_early"], metric, log_scale),
                        dpi=110)
