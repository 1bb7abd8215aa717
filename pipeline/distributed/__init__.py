"""The Ray layer: certification over Ray Data, denoiser and classifier training over Ray Train, sweeps over Ray Tune.
It wires the library to Ray and adds no math and no run bookkeeping.

Ray's own output is quiet by default: no Ray Data progress bars or progress dumps, no execution plans,
and Ray's INFO logs stay in the session's log files (`/tmp/ray/session_*/logs`); Ray's warnings and
errors still show. `set_verbose(True)` (the command line's `-v`) brings all of it back."""

from __future__ import annotations

import logging
import os
import warnings

if not os.environ.get("RAY_ADDRESS"):
    # No cluster named, so a local instance: Ray's single-host mode (read when Ray is imported, inherited by
    # the processes Ray starts) binds every one of its servers to 127.0.0.1 instead of every interface.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray

__all__ = ["init_ray", "is_verbose", "set_verbose"]

log = logging.getLogger(__name__)

_VERBOSE = [False]
RAY_LOGGERS = ("ray", "ray.tune", "ray.train", "ray.air")


def set_verbose(verbose: bool) -> None:
    """Shows (True) or hides (False, the default) Ray's progress output and INFO logs in this process."""
    _VERBOSE[0] = bool(verbose)
    _quiet_ray_data(verbose)
    level = logging.INFO if verbose else logging.WARNING
    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    if not verbose:  # Ray's Python warnings (deprecations, concurrency hints) are for -v
        warnings.filterwarnings("ignore", module=r"ray(\.|$)")
        # Tune's output engine prints its experiment box whatever the verbosity; the legacy one is silent at 0
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def is_verbose() -> bool:
    return _VERBOSE[0]


def _quiet_ray_data(verbose: bool) -> None:
    """Ray Data's progress bars (and, off a terminal, its periodic progress dumps), the execution plan
    printed at start and its INFO lines on the console; its log file keeps everything."""
    context = ray.data.DataContext.get_current()
    for option in ("enable_progress_bars", "enable_operator_progress_bars", "print_on_execution_start"):
        if hasattr(context, option):
            setattr(context, option, verbose)
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ == "PlainRayHandler":  # the console; the file handler keeps DEBUG
            handler.setLevel(logging.INFO if verbose else logging.WARNING)
    for name, notices in NOTICES.items():
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, _NoticeFilter)]:
            logger.removeFilter(old)
        if not verbose:
            logger.addFilter(_NoticeFilter(notices))


# Notices Ray logs as warnings that ask nothing of the user: the progress bars are off on purpose; a local
# instance has token authentication on (the default; the warning that it is off still shows); Tune's
# experiment state is saved as it goes (the sweep never reads it back); after a sweep is interrupted, Tune's advice
# to resume with `Tuner.restore` (a sweep resumes by rerunning its command, as its own line says) and its list of
# the trials it stopped and of the stopped trials whose metrics it could not read (trials.parquet has their status).
NOTICES = {"ray.data._internal.progress": ("Progress bars disabled", "Progress bars for operators disabled"),
           "ray._private.authentication.authentication_token_setup": (
               "Token authentication is enabled for this Ray cluster",),
           "ray.tune.execution.experiment_state": ("Experiment state snapshotting has been triggered",),
           "ray.tune.tune": ("Experiment has been interrupted", "Trials did not complete"),
           "ray.tune.analysis.experiment_analysis": ("Failed to fetch metrics",)}


class _NoticeFilter(logging.Filter):
    """Drops the records whose message starts with one of `notices`."""

    def __init__(self, notices: tuple[str, ...]):
        super().__init__()
        self.notices = notices

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.notices)


def init_ray() -> None:
    """Joins the cluster named by RAY_ADDRESS (as under `ray job submit`), or starts a local instance with at
    least 4 logical CPUs, so that read and write tasks keep running beside the actors, listening on
    127.0.0.1 only. Applies the verbosity of `set_verbose` (quiet by default); workers' output still
    reaches the driver."""
    set_verbose(is_verbose())
    if ray.is_initialized():
        return
    level = logging.INFO if is_verbose() else logging.WARNING
    if os.environ.get("RAY_ADDRESS"):
        log.info("joining the Ray cluster at %s", os.environ["RAY_ADDRESS"])
        ray.init(log_to_driver=True, logging_level=level)
    else:
        cpus = max(4, os.cpu_count() or 1)
        log.info("starting a local Ray instance with %d logical CPUs", cpus)
        # "local": a new instance, never another Ray instance found running on this machine
        ray.init(address="local", num_cpus=cpus, logging_level=level)
