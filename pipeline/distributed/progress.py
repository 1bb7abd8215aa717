"""Progress of Ray Train trainings and Ray Tune sweeps, in the project's one display (`pipeline.progress`).

- `TrainProgress`: a Ray Train callback on the training controller; after each epoch's report it counts
  the epoch and shows the loss and validation accuracy. The controller is a Ray actor, so it prints its
  lines (Ray forwards them to the driver, prefixed with the controller's name).
- `SweepProgress`: a Ray Tune callback on the driver; it counts finished trials of the sweep's total and
  shows how many run and the best objective so far, with that trial's sampled values.

Both hold their display outside their pickled state, so Ray can ship them (and Tune restore them).
"""

from __future__ import annotations

import logging
import math

from ray import tune

from pipeline.progress import Progress
from pipeline.sweeps import plan_trials

try:  # Ray Train's callbacks on the controller (Train v2)
    from ray.train import UserCallback
except ImportError:  # pragma: no cover - older Ray
    UserCallback = object

log = logging.getLogger(__name__)

__all__ = ["SweepProgress", "TrainProgress"]


class TrainProgress(UserCallback):
    """Epochs reported of `total`, with the loss and the validation accuracy of the last."""

    def __init__(self, total: int, name: str):
        self.total, self.name = total, name
        self._progress = None

    def __getstate__(self) -> dict:
        return {"total": self.total, "name": self.name, "_progress": None}

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        reported = metrics[0] if metrics else {}
        if "epoch" not in reported:
            return
        if self._progress is None:
            self._progress = Progress(self.total, "epochs", f"training {self.name}", tty=False,
                                      initial=reported["epoch"] - 1, emit=lambda line: print(line, flush=True))
        self._progress.update(reported["epoch"] - self._progress.done, loss=reported.get("train_loss", math.nan),
                              val_accuracy=reported.get("val_accuracy", math.nan))
        if self._progress.done >= self.total:
            self._progress.close()


class SweepProgress(tune.Callback):
    """Trials finished of `total` (errors counted as failed), how many run, and the best `metric` so far."""

    def __init__(self, total: int, metric: str, searched: list[str], done: int = 0,
                 plan: dict[str, dict] | None = None):
        self.total, self.metric, self.searched, self.done = total, metric, searched, done
        self.plan = plan or {}  # trial key -> sampled config, for trials Tune knows only by their key
        self._progress = None
        self._best = (-math.inf, None)

    @classmethod
    def of(cls, sweep, record=None) -> SweepProgress:
        """The callback for a `pipeline.sweeps.SweepConfig`: its trial count (the trials of its
        `pipeline.sweeps.SweepRecord`, else of its plan), the trials the record already has finished, its
        metric and its searched keys."""
        if record is None or not record.trials:
            return cls(len(plan_trials(sweep)), sweep.metric, list(sweep.search))
        finished = sum(trial["status"] == "finished" for trial in record.trials.values())
        return cls(len(record.trials), sweep.metric, list(sweep.search), finished,
                   {key: trial["config"] for key, trial in record.trials.items()})

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_progress": None}

    def _display(self, trials) -> Progress:
        if self._progress is None:
            finished = self.done + sum(trial.status in ("TERMINATED", "ERROR") for trial in trials)
            self._progress = Progress(max(self.total, len(trials)), "trials", "sweep", logger=log, initial=finished)
        self._progress.total = max(self._progress.total, self.done + len(trials))
        return self._progress

    def _fields(self, trials, ended=None) -> dict:
        fields = {"running": sum(trial.status == "RUNNING" and trial is not ended for trial in trials)}
        value, config = self._best
        if config is not None:
            shown = ", ".join(f"{key}={_short(config.get(key))}" for key in self.searched)
            fields["best"] = f"{self.metric} {value:.4g} ({shown})"
        return fields

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        value = result.get(self.metric)
        if isinstance(value, int | float) and math.isfinite(value) and value > self._best[0]:
            self._best = (float(value), dict(self.plan.get(trial.config.get("trial"), trial.config)))
        progress = self._display(trials)
        progress.update(0, **self._fields(trials))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._display(trials).update(1, **self._fields(trials, trial))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._display(trials).update(1, failed=1, **self._fields(trials, trial))

    def on_experiment_end(self, trials, **info) -> None:
        if self._progress is not None:
            self._progress.close()


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
