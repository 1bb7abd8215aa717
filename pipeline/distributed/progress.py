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
from pipeline.sweeps import best_trial, finished_scores, plan_trials

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
    """Trials ended of `total` (errors counted as failed; each trial once, so never more than the plan), how
    many run, and the best `metric` so far by the sweep's one rule (`pipeline.sweeps.best_trial`: errored
    trials never count, ties go to the earliest trial), so it names the trial the outputs will name."""

    def __init__(self, total: int, metric: str, searched: list[str], done: int = 0,
                 plan: dict[str, dict] | None = None, scores: dict[str, float] | None = None):
        self.total, self.metric, self.searched, self.done = total, metric, searched, done
        self.plan = plan or {}  # trial key -> sampled config, for trials Tune knows only by their key
        self.scores = dict(scores or {})  # trial key -> its best objective so far (earlier attempts' finished)
        self.configs: dict[str, dict] = {}
        self.ended: set[str] = set()
        self.errored: set[str] = set()
        self._progress = None

    @classmethod
    def of(cls, sweep, record=None) -> SweepProgress:
        """The callback for a `pipeline.sweeps.SweepConfig`: its trial count (the trials of its
        `pipeline.sweeps.SweepRecord`, else of its plan), the trials the record already has finished and their
        objectives, its metric and its searched keys."""
        if record is None or not record.trials:
            total = sweep.num_samples if sweep.search_algorithm == "optuna" else len(plan_trials(sweep))
            return cls(total, sweep.metric, list(sweep.search))
        scores = finished_scores(sweep, record)
        return cls(record.counts(sweep)[2], sweep.metric, list(sweep.search), len(scores),
                   {key: trial["config"] for key, trial in record.trials.items()}, scores)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_progress": None}

    def _key(self, trial) -> str:
        return trial.config.get("trial", trial.trial_id)

    def _display(self) -> Progress:
        if self._progress is None:
            self._progress = Progress(self.total, "trials", "sweep", logger=log, initial=min(self.done, self.total))
        return self._progress

    def _fields(self, trials, ended=None) -> dict:
        fields = {"running": sum(trial.status == "RUNNING" and trial is not ended for trial in trials)}
        key = best_trial({key: value for key, value in self.scores.items() if key not in self.errored})
        if key is not None:
            config = self.plan.get(key, self.configs.get(key, {}))
            shown = ", ".join(f"{name}={_short(config.get(name))}" for name in self.searched)
            fields["best"] = f"{self.metric} {self.scores[key]:.4g} ({shown})"
        return fields

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        key, value = self._key(trial), result.get(self.metric)
        if isinstance(value, int | float) and math.isfinite(value) and value > self.scores.get(key, -math.inf):
            self.scores[key] = float(value)
            self.configs.setdefault(key, {k: v for k, v in trial.config.items() if k != "trial"})
        self._display().update(0, **self._fields(trials))

    def _end(self, trials, trial, failed: bool) -> None:
        key = self._key(trial)
        if failed:
            self.errored.add(key)
        new = key not in self.ended and self.done + len(self.ended) < self.total
        self.ended.add(key)
        self._display().update(1 if new else 0, **({"failed": 1} if failed and new else {}),
                               **self._fields(trials, trial))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._end(trials, trial, failed=False)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._end(trials, trial, failed=True)

    def on_experiment_end(self, trials, **info) -> None:
        if self._progress is not None:
            self._progress.close()


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
