"""Sweep campaigns with Ray Tune over denoiser training: sigma, DE-CROP's generation settings, loss weights,
any training setting.

A sweep YAML names a base training config (`train`: a path or a mapping), a search space over dotted keys
of it (`search`: {key: {grid | choice: [...]} or {uniform | loguniform: [low, high]}}), the objective
(`objective`: certified accuracy at a radius, or ACR, measured every epoch by a cheap Cohen certification
of the held-out validation split with `certification` n0 / n / alpha), the scheduler (ASHA over epochs by
default, or FIFO), the search algorithm (grid and random built in, Optuna when installed), resources per
trial (fractional GPUs allowed) and where the sweep is written (`output`, local or s3://, with `storage`).
The sweep config is `pipeline.sweeps.SweepConfig`; this module only wires it to Ray Tune.

Every trial reports its metrics every epoch (ASHA stops weak trials, counting epochs) and trains resumably
into the sweep's own record (`pipeline.sweeps`), so an interrupted sweep resumes exactly: finished trials
are not run again, unfinished ones continue after their last finished epoch, and nothing Tune pickled is
ever read back (each attempt is a fresh Tune experiment). At the end the sweep writes its outputs
(`pipeline.sweeps.write_outputs`): `trials.parquet` (config, metrics, status of every trial),
`objective.png`, and the best configuration as `best_train.yaml` (for jobs/train_denoiser.py) and
`best_certify.yaml` (for jobs/certify.py, with the best trial's denoiser). The trials' objective is
`pipeline.sweeps.trial_objective`.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

from ray import tune
from ray.tune.execution import class_cache
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from pipeline.config import ConfigError, DenoiserConfig, validate
from pipeline.denoise.train import fit_resumable
from pipeline.distributed import init_ray, is_verbose, set_verbose
from pipeline.distributed.certify import run
from pipeline.distributed.progress import SweepProgress
from pipeline.sweeps import SweepConfig, SweepRecord, remove_best, trial_config, trial_objective, write_outputs

CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")

log = logging.getLogger(__name__)

__all__ = ["run_sweep"]


def keep_credentials_out_of_runtime_envs() -> None:
    """Ray Tune copies the driver's AWS credential variables into every trial's runtime env, and Ray's
    runtime-env agent writes runtime envs to its log in plain text (which the dashboard serves). Trials get
    credentials by the standard chain of the node they run on instead (its environment, profile or instance
    role), as every other Ray worker of the project does."""
    class_cache.ENV_VARS_TO_PROPAGATE.difference_update(CREDENTIALS)


def _space(search: dict) -> dict:
    """The search space as Tune's (for Optuna, which samples it itself)."""
    space = {}
    for key, spec in search.items():
        kind, values = next(iter(spec.items()))
        if kind == "grid":
            space[key] = tune.grid_search(list(values))
        elif kind == "choice":
            space[key] = tune.choice(list(values))
        elif kind == "uniform":
            space[key] = tune.uniform(*values)
        else:
            space[key] = tune.loguniform(*values)
    return space


def _trainable(config: dict, sweep: SweepConfig, plan: dict[str, dict], verbose: bool = False) -> None:
    """One trial: trains its denoiser resumably into the sweep's `trials/<key>/` and reports every epoch to
    Tune; a restarted trial (a killed worker, a resumed sweep) goes on after its last finished epoch."""
    set_verbose(verbose)  # the trial's own process: Ray's INFO lines only with -v
    key = config["trial"] if "trial" in config else tune.get_context().get_trial_id()
    train = DenoiserConfig.from_dict({**trial_config(sweep, plan.get(key, config)), "workers": 0})
    fit_resumable(train, _location(sweep).join("trials", key), evaluate=trial_objective(sweep, train),
                  on_epoch=lambda metrics: tune.report({**metrics, "trial": key}),
                  score=lambda metrics: (metrics[sweep.metric], metrics["val_accuracy"]), show=False)


class _Recorder(tune.Callback):
    """Writes each trial's start (for Optuna, whose trials are not planned) and end into the sweep record."""

    def __init__(self, record: SweepRecord):
        self.record = record

    def on_trial_start(self, iteration, trials, trial, **info):
        if "trial" not in trial.config:
            self.record.add(trial.trial_id, trial.config)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.record.mark(trial.config.get("trial", trial.trial_id), "finished")

    def on_trial_error(self, iteration, trials, trial, **info):
        error = (trial.get_error() or "failed").strip().splitlines()[-1]
        self.record.mark(trial.config.get("trial", trial.trial_id), "error", error)


def _scheduler(sweep: SweepConfig, epochs: int):
    settings = sweep.scheduler
    if settings.name == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="epoch", max_t=settings.max_t or epochs, grace_period=settings.grace_period or 1,
                         reduction_factor=settings.reduction_factor or 2)


def _search_algorithm(sweep: SweepConfig):
    if sweep.search_algorithm != "optuna":
        return None
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as error:
        raise ConfigError("search_algorithm: optuna needs the optuna package (pip install optuna)") from error
    return OptunaSearch()


def _location(sweep: SweepConfig):
    return sweep.storage.open(sweep.output).join(sweep.name)


def run_sweep(sweep: SweepConfig) -> str:
    """Runs the sweep, or resumes it from its record (finished trials are not run again, unfinished ones go on
    after their last finished epoch; `pipeline.sweeps.SweepRecord.open` refuses a folder that is not this
    sweep's); writes the trial table, the plot and, once every planned trial has ended, the best configs
    (`pipeline.sweeps.write_outputs`); returns the sweep's URI. An attempt that trials are left from (Ctrl-C,
    SIGTERM: Tune stops its trials, each keeping its last finished epoch) writes no best configs and raises
    `pipeline.sweeps.SweepInterrupted`, whose message says how many trials are finished and that a rerun
    resumes."""
    location = _location(sweep)
    record = SweepRecord.open(sweep, location)  # before Ray starts: a refused folder fails fast
    todo = record.unfinished()
    if record.data["attempts"] > 1:
        log.info("resuming sweep %s from %s: %d of %d trials to run", sweep.name, location.uri, len(todo),
                 len(record.trials))
    exit_code = 130
    if todo or not record.trials:
        remove_best(location)  # an earlier best is not this sweep's best until every trial has ended
        record.retry(todo)
        init_ray()  # before the handler below: Ray's own SIGTERM handler, set on start, exits at once
        with _stop_on_sigterm() as received:
            try:
                _run_trials(sweep, record, todo)
            except KeyboardInterrupt:  # a second Ctrl-C, or one before Tune took over
                log.warning("sweep %s: stopped by Ctrl-C", sweep.name)
        exit_code = 143 if received else 130
    certify = write_outputs(sweep, record, exit_code)
    if sweep.final_certify:
        run(validate(certify))
    return location.uri


@contextlib.contextmanager
def _stop_on_sigterm():
    """While the sweep runs, SIGTERM (`ray job stop`, a scheduler's stop) stops it as Ctrl-C does: Tune's own
    SIGINT handler ends the experiment after saving each trial's last epoch (outside Tune, KeyboardInterrupt).
    Yields a list that holds the signal once received."""
    received: list[int] = []

    def stop(signum, frame):
        received.append(signum)
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_trials(sweep: SweepConfig, record: SweepRecord, todo: list[str]) -> None:
    """One attempt on Ray Tune: the planned trials still to run as a grid over their keys (Optuna: its own
    samples), in a fresh experiment folder `tune/attempt-<n>` that no later attempt reads."""
    init_ray()
    keep_credentials_out_of_runtime_envs()
    base = DenoiserConfig.from_dict(sweep.train)
    optuna = sweep.search_algorithm == "optuna"
    plan = {key: record.trials[key]["config"] for key in todo}
    tune_storage = record.location.join("tune")
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trainable, sweep=sweep, plan=plan, verbose=is_verbose()),
                            sweep.resources.model_dump()),
        param_space=_space(sweep.search) if optuna else {"trial": tune.grid_search(todo)},
        tune_config=tune.TuneConfig(metric=sweep.metric, mode="max",
                                    scheduler=_scheduler(sweep, base.epochs + base.second_epochs),
                                    search_alg=_search_algorithm(sweep), num_samples=sweep.num_samples if optuna else 1,
                                    max_concurrent_trials=sweep.max_concurrent,
                                    # a finished trial's worker takes the next trial (each trial seeds its own
                                    # training), instead of a new process importing torch for every trial
                                    reuse_actors=True),
        run_config=tune.RunConfig(name=f"attempt-{record.data['attempts']}", storage_path=tune_storage.path,
                                  storage_filesystem=tune_storage.fs,
                                  callbacks=[_Recorder(record), SweepProgress.of(sweep, record)],
                                  verbose=2 if is_verbose() else 0,  # Tune's tables only with -v
                                  failure_config=tune.FailureConfig(max_failures=2)))
    tuner.fit()
