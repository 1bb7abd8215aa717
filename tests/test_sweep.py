"""Sweeps on Ray Tune: a tiny ASHA sweep end to end, kills at every write resumed into the same experiment,
folders this project did not write refused, clear errors."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
import yaml

from pipeline import cli
from pipeline.config import ConfigError, validate
from pipeline.distributed.tune import run_sweep
from pipeline.sweeps import (
    SweepConfig,
    SweepFailed,
    SweepInterrupted,
    SweepRecord,
    SweepRefused,
    best_certify_config,
    best_trial,
    load_sweep,
    plan_trials,
    write_outputs,
)
from pipeline.train_demo import train_demo_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clean_classifier(tmp_path_factory):
    path = tmp_path_factory.mktemp("classifier") / "clean.pt"
    return train_demo_model(noise=["none"], epochs=8, output=path)


def sweep_config(tmp_path, classifier, **overrides):
    sweep = {
        "name": "tiny", "output": str(tmp_path / "sweeps"),
        "train": {"classifier": {"name": "demo_cnn", "weights": str(classifier)}, "objective": "stab",
                  "denoiser": {"depth": 3, "channels": 8}, "subset": {"per_class": 2, "seed": 3, "validation": 0.5},
                  "epochs": 4, "batch_size": 10, "output": str(tmp_path / "denoisers")},
        "search": {"lr": {"grid": [1e-7, 3e-3]}},
        "objective": {"metric": "acr"}, "certification": {"n0": 10, "n": 50, "alpha": 0.01},
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "search_algorithm": "random", "num_samples": 2, "resources": {"cpu": 1},
        "final": {"dataset": {"layout": "demo", "split": "test", "max": 4},
                  "certification": {"n0": 10, "n": 50, "alpha": 0.01}, "output": str(tmp_path / "runs")},
    }
    sweep.update(overrides)
    return sweep


def test_tiny_asha_sweep_writes_trials_and_a_best_config_that_trains_and_certifies(ray_cluster, clean_classifier,
                                                                                  tmp_path):
    # one trial at a time: the grid comes in order (1e-7, 3e-3, 1e-7, 3e-3), so ASHA's decision at the first
    # rung does not depend on which concurrent trial reports first
    sweep = sweep_config(tmp_path, clean_classifier, max_concurrent=1)
    uri = run_sweep(SweepConfig.from_dict(sweep))
    # Ray Tune copies the driver's AWS credentials into every trial's runtime env, which Ray logs in plain text
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    leaked = [path.name for path in logs.rglob("*") if path.is_file() and (
        b"AWS_SECRET_ACCESS_KEY" in path.read_bytes() or b'"' + secret + b'"' in path.read_bytes())]
    assert not leaked, f"credentials in Ray's logs: {leaked}"
    trials = pd.read_parquet(Path(uri) / "trials.parquet")
    assert len(trials) == 4 and set(trials["status"]) == {"finished"}
    assert trials["stopped_early"].any(), trials[["config.lr", "acr", "epochs_run"]]
    assert (Path(uri) / "objective.png").read_bytes().startswith(b"\x89PNG")

    best_train = yaml.safe_load((Path(uri) / "best_train.yaml").read_text())
    assert best_train["lr"] == pytest.approx(3e-3)  # learning beats the (nearly) frozen identity denoiser
    (tmp_path / "best_train.yaml").write_text(yaml.safe_dump({**best_train, "run_name": "again"}))
    assert cli.main(["train-denoiser", "--config", str(tmp_path / "best_train.yaml")]) == 0
    assert cli.main(["certify", "--config", str(Path(uri) / "best_certify.yaml")]) == 0
    rows = pd.read_parquet(tmp_path / "runs" / "tiny-best" / "results")
    assert len(rows) == 4 and set(rows["status"]) == {"ok"}


def test_a_sweep_stopped_by_ctrl_c_writes_no_best_and_a_rerun_finishes_it(ray_cluster, clean_classifier, tmp_path,
                                                                           capsys):
    """Row 80: Ctrl-C (SIGINT; Tune ends its experiment) after the first of 2 trials finished: no best configs,
    SweepInterrupted with exit code 130 and the count of finished trials; rerunning the same command resumes
    and only then writes the best."""
    import threading

    sweep = sweep_config(tmp_path, clean_classifier, max_concurrent=1, scheduler={"name": "fifo"},
                         search={"lr": {"grid": [1e-7, 3e-3]}}, num_samples=1)
    sweep["train"]["epochs"] = 1
    folder = tmp_path / "sweeps" / "tiny"
    running = threading.Event()

    def interrupt_after_the_first_trial() -> None:
        while running.is_set():
            path = folder / "sweep.json"
            statuses = [t["status"] for t in json.loads(path.read_text())["trials"].values()] if path.exists() else []
            if statuses[:1] == ["finished"]:
                os.kill(os.getpid(), signal.SIGINT)  # Tune's handler, in the main thread
                return
            time.sleep(0.02)

    previous = signal.signal(signal.SIGINT, lambda *_: None)  # Tune restores this one after its own
    running.set()
    watcher = threading.Thread(target=interrupt_after_the_first_trial)
    watcher.start()
    try:
        with pytest.raises(SweepInterrupted, match=r"^sweep tiny interrupted: 1 of 2 trials finished, no best "
                                                   r"configs written; rerun the same command to resume") as caught:
            run_sweep(SweepConfig.from_dict(sweep))
    finally:
        running.clear()
        watcher.join()
        signal.signal(signal.SIGINT, previous)
    assert caught.value.exit_code == 130
    record = json.loads((folder / "sweep.json").read_text())
    assert [trial["status"] for trial in record["trials"].values()] == ["finished", "pending"]
    assert not (folder / "best_train.yaml").exists() and not (folder / "best_certify.yaml").exists()
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(sweep))
    assert cli.main(["sweep", "--config", str(config)]) == 0
    assert f"best: {folder}/best_train.yaml" in capsys.readouterr().out
    record = json.loads((folder / "sweep.json").read_text())
    assert record["attempts"] == 2 and {trial["status"] for trial in record["trials"].values()} == {"finished"}
    assert (folder / "best_train.yaml").exists() and (folder / "best_certify.yaml").exists()


class Planted:
    """A pickle that would leave a marker file if anything unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


@pytest.mark.faults
def test_a_sweep_killed_at_each_write_resumes_into_the_same_experiment(ray_cluster, clean_classifier, kill_actors,
                                                                       tmp_path):
    sweep = sweep_config(tmp_path, clean_classifier, max_concurrent=1, scheduler={"name": "fifo"},
                         search={"lr": {"grid": [1e-7, 3e-3, 1e-3]}}, num_samples=1)
    sweep["train"]["epochs"] = 2
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(sweep))
    folder = tmp_path / "sweeps" / "tiny"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}

    def start(kill_at: str = "") -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(ROOT / "tests" / "kill_at.py"), "sweep", "--config", str(config)],
                                env={**env, "KILL_AT": kill_at}, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    def epochs(key: str) -> list[int]:
        last = folder / "trials" / key / "last.json"
        return [epoch["epoch"] for epoch in json.loads(last.read_text())["history"]] if last.exists() else []

    def wait_for(condition, job: subprocess.Popen) -> None:
        deadline = time.monotonic() + 300
        while not condition():
            assert job.poll() is None and time.monotonic() < deadline, "the sweep ended before the kill point"
            time.sleep(0.1)

    # killed while writing the plan: nothing but a partial file, which a rerun ignores
    assert start("sweep.json:1:during").wait() == -signal.SIGKILL
    assert not (folder / "sweep.json").exists()
    # killed right after the first trial's end is recorded
    assert start("sweep.json:2:after").wait() == -signal.SIGKILL
    record = json.loads((folder / "sweep.json").read_text())
    assert [trial["status"] for trial in record["trials"].values()] == ["finished", "pending", "pending"]
    first = (folder / "trials" / "t000" / "last.json").read_bytes()
    # the second trial's worker killed mid-trial (Tune restarts it after its last epoch), then the driver
    # killed while writing that trial's end
    job = start("sweep.json:2:during")
    wait_for(lambda: epochs("t001") == [1], job)
    assert kill_actors("ImplicitFunc") == 1  # the trial's worker
    assert job.wait() == -signal.SIGKILL
    assert epochs("t001") == [1, 2]
    # the driver killed mid-trial, by a signal from outside
    job = start()
    wait_for(lambda: epochs("t002") == [1], job)
    job.kill()
    job.wait()
    # whatever state Ray Tune left is never read back: damaged, emptied, or replaced by a planted pickle
    marker = tmp_path / "marker"
    for path in (folder / "tune").rglob("*"):
        if path.name.startswith("experiment_state"):
            path.write_text(path.read_text()[:20])
        elif path.suffix == ".pkl":
            path.write_bytes(pickle.dumps(Planted(marker)))

    run_sweep(load_sweep(config))
    assert not marker.exists()
    record = json.loads((folder / "sweep.json").read_text())
    assert record["attempts"] == 4 and record["trials"] == {
        key: {"config": config, "status": "finished", "error": None}
        for key, config in plan_trials(SweepConfig.from_dict(sweep)).items()}
    assert (folder / "trials" / "t000" / "last.json").read_bytes() == first  # not trained again
    assert [epochs(key) for key in record["trials"]] == [[1, 2]] * 3  # every epoch exactly once
    trials = pd.read_parquet(folder / "trials.parquet")
    assert list(trials["trial_id"]) == ["t000", "t001", "t002"] and set(trials["status"]) == {"finished"}
    assert list(trials["epochs_run"]) == [2, 2, 2]


def test_a_sweep_folder_this_project_did_not_write_is_refused_before_anything_is_read(tmp_path, capsys):
    sweep = SweepConfig.from_dict(sweep_config(tmp_path, "weights.pt"))
    folder = tmp_path / "sweeps" / "tiny"
    folder.mkdir(parents=True)
    marker = tmp_path / "marker"
    (folder / "tuner.pkl").write_bytes(pickle.dumps(Planted(marker)))
    location = sweep.storage.open(str(folder))
    with pytest.raises(SweepRefused, match=r"holds files but no sweep\.json"):
        SweepRecord.open(sweep, location)
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(sweep_config(tmp_path, "weights.pt")))
    assert cli.main(["sweep", "--config", str(config)]) == 2
    assert "no sweep.json, so this project did not write it" in capsys.readouterr().err
    (folder / "tuner.pkl").unlink()
    record = SweepRecord.open(sweep, location)
    assert list(record.trials) == ["t000", "t001", "t002", "t003"] and record.unfinished() == list(record.trials)
    assert [trial["config"]["lr"] for trial in record.trials.values()] == [1e-7, 3e-3, 1e-7, 3e-3]
    other = SweepConfig.from_dict({**sweep_config(tmp_path, "weights.pt"), "num_samples": 3})
    with pytest.raises(SweepRefused, match="records another sweep"):
        SweepRecord.open(other, location)
    (folder / "sweep.json").write_text('{"format": "pipeline-sweep/1", "trials": ')
    with pytest.raises(SweepRefused, match=r"sweep\.json is damaged"):
        SweepRecord.open(sweep, location)
    assert not marker.exists()


def test_random_search_plans_are_seeded_and_cross_the_grid():
    sweep = SweepConfig.from_dict({**sweep_config(Path("/tmp"), "weights.pt"), "num_samples": 3,
                                   "search": {"lr": {"loguniform": [1e-4, 1e-2]}, "sigma": {"grid": [0.25, 0.5]}}})
    plan = plan_trials(sweep)
    assert plan == plan_trials(sweep) and len(plan) == 6
    assert [trial["sigma"] for trial in plan.values()] == [0.25, 0.5] * 3
    assert all(1e-4 <= trial["lr"] <= 1e-2 for trial in plan.values()) and len({t["lr"] for t in plan.values()}) == 6


def test_bad_sweeps_give_clear_errors(tmp_path):
    base = sweep_config(tmp_path, "weights.pt")
    with pytest.raises(ConfigError, match="search space is empty"):
        SweepConfig.from_dict({**base, "search": {}})
    with pytest.raises(ConfigError, match=r"objective\.metric must be one of"):
        SweepConfig.from_dict({**base, "objective": {"metric": "top5"}})
    with pytest.raises(ConfigError, match=r"objective\.radius=2\.0 cannot be certified: with n=50"):
        SweepConfig.from_dict({**base, "objective": {"metric": "certified_accuracy", "radius": 2.0}})
    with pytest.raises(ConfigError, match=r"search\.lr: give one of"):
        SweepConfig.from_dict({**base, "search": {"lr": [1, 2]}})
    with pytest.raises(ConfigError, match=r"storage: the sweep's folder is `output`"):
        SweepConfig.from_dict({**base, "storage": "runs/sweeps"})
    with pytest.raises(ConfigError, match=r"search\.sigma: every sigma must be a number > 0, got \['a', 0\.5\]"):
        SweepConfig.from_dict({**base, "search": {"sigma": {"choice": ["a", 0.5]}},
                               "objective": {"metric": "certified_accuracy", "radius": 0.1}})


@pytest.mark.parametrize(("space", "message"), [
    ({"grid": []}, r"search\.lr\.grid must be a non-empty list of values"),
    ({"choice": []}, r"search\.lr\.choice must be a non-empty list of values"),
    ({"grid": 5}, r"search\.lr\.grid must be a non-empty list of values, .*got 5"),
    ({"uniform": []}, r"search\.lr\.uniform must be two finite numbers \[low, high\]"),  # once: [0, 1)
    ({"uniform": [1e-3]}, r"search\.lr\.uniform must be two finite numbers"),
    ({"uniform": [0, float("inf")]}, r"search\.lr\.uniform must be two finite numbers"),
    ({"uniform": ["a", "b"]}, r"search\.lr\.uniform must be two finite numbers"),
    ({"uniform": [1, 0]}, r"search\.lr\.uniform needs low < high, got \[1, 0\]"),
    ({"loguniform": [0, 1]}, r"search\.lr\.loguniform needs low > 0"),
    ({"loguniform": [1e-2, 1e-2]}, r"search\.lr\.loguniform needs low < high"),
])
def test_a_malformed_search_space_is_refused_naming_the_key(tmp_path, capsys, space, message):
    """Row 77/78: every malformed distribution is one line naming `search.<key>`, before any sweep folder is
    written (an empty grid once left a sweep.json of 0 trials that crashed every rerun)."""
    sweep = {**sweep_config(tmp_path, "weights.pt"), "search": {"lr": space}}
    with pytest.raises(ConfigError, match=message):
        SweepConfig.from_dict(sweep)
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(sweep))
    assert cli.main(["sweep", "--config", str(config)]) == 2
    assert "pipeline: invalid sweep: search.lr." in capsys.readouterr().err
    assert not (tmp_path / "sweeps").exists()


def test_a_sweep_record_with_no_planned_trial_is_refused_with_a_message(tmp_path, capsys):
    """A sweep.json of 0 trials (written by an earlier version for `grid: []`) is refused in one line, not a
    crash inside Ray Tune."""
    sweep = sweep_config(tmp_path, "weights.pt")
    folder = tmp_path / "sweeps" / "tiny"
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text(json.dumps({"format": "pipeline-sweep/1", "digest": "0" * 64, "attempts": 1,
                                                   "definition": {"search_algorithm": "random"}, "trials": {}}))
    with pytest.raises(SweepRefused, match=r"sweep\.json plans no trial .* remove .* to start over"):
        SweepRecord.open(SweepConfig.from_dict(sweep), SweepConfig.from_dict(sweep).storage.open(str(folder)))
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(sweep))
    assert cli.main(["sweep", "--config", str(config)]) == 2
    assert "plans no trial" in capsys.readouterr().err


def _recorded(tmp_path, statuses: dict[str, str], scores: dict[str, list[float]]):
    """A sweep record of 4 planned trials with the given statuses, each trial with the epochs' `acr` of
    `scores` in its last.json and a best/ artifact, as the trials write them."""
    sweep = SweepConfig.from_dict(sweep_config(tmp_path, "weights.pt"))
    location = sweep.storage.open(sweep.output).join(sweep.name)
    record = SweepRecord.open(sweep, location)
    for key, values in scores.items():
        trial = Path(location.join("trials", key).path)
        (trial / "best").mkdir(parents=True)
        (trial / "best" / "artifact.json").write_text("{}")
        history = [{"epoch": epoch, "acr": value, "val_accuracy": 0.5} for epoch, value in enumerate(values, 1)]
        (trial / "last.json").write_text(json.dumps({"epoch": len(values), "sha256": {}, "history": history}))
    for key, status in statuses.items():
        record.mark(key, status, "boom" if status == "error" else None)
    return sweep, record, Path(location.path)


def test_an_interrupted_sweep_writes_no_best_and_says_how_many_trials_are_finished(tmp_path):
    """Row 80: after Ctrl-C with 1 of 4 trials finished, no best configs (stale ones removed), exit code 130,
    one line with the counts and the way to resume; the trial table is still written."""
    sweep, record, folder = _recorded(tmp_path, {"t000": "finished"}, {"t000": [0.1, 0.3], "t001": [0.2]})
    (folder / "best_train.yaml").write_text("stale: true\n")
    with pytest.raises(SweepInterrupted, match=r"^sweep tiny interrupted: 1 of 4 trials finished, no best configs "
                                               r"written; rerun the same command to resume") as caught:
        write_outputs(sweep, record)
    assert caught.value.exit_code == 130
    assert not (folder / "best_train.yaml").exists() and not (folder / "best_certify.yaml").exists()
    assert list(pd.read_parquet(folder / "trials.parquet")["status"]) == ["finished"] + ["pending"] * 3
    # an errored trial is retried by the next attempt, so it is pending again while that attempt runs
    record.mark("t001", "error", "boom")
    record.retry(record.unfinished())
    assert [trial["status"] for trial in record.trials.values()] == ["finished"] + ["pending"] * 3


def test_the_best_is_the_earliest_of_the_top_finished_trials_never_an_errored_one(tmp_path):
    """Row 81: an errored trial with the highest objective is not the best; equal objectives go to the earliest
    trial (the rule the progress line uses too); with only errored trials reporting, SweepFailed and no best."""
    statuses = {"t000": "error", "t001": "finished", "t002": "finished", "t003": "finished"}
    sweep, record, folder = _recorded(tmp_path, statuses, {"t000": [0.9], "t001": [0.2, 0.5], "t002": [0.5],
                                                           "t003": [0.4]})
    certify = write_outputs(sweep, record)
    assert certify["model"]["denoiser"].endswith("/trials/t001/best")
    assert yaml.safe_load((folder / "best_train.yaml").read_text())["lr"] == record.trials["t001"]["config"]["lr"]
    assert best_trial({"t010": 0.5, "t002": 0.5, "t001": float("nan"), "t003": 0.4}) == "t002"
    for key in ("t001", "t002", "t003"):
        record.mark(key, "error", "boom")
    with pytest.raises(SweepFailed, match=r"no finished trial of sweep tiny reported acr \(4 of 4 errored, 4 "
                                          r"reported before failing\)"):
        write_outputs(sweep, record)
    assert not (folder / "best_train.yaml").exists() and not (folder / "best_certify.yaml").exists()


def test_sweep_progress_counts_trials_and_shows_the_best_so_far(caplog):
    """The sweep's one progress display: finished trials of the total, how many run, the best objective with
    its sampled values; it pickles without its display (Tune saves and restores its callbacks)."""
    import logging
    import pickle
    from types import SimpleNamespace

    from pipeline.distributed.progress import SweepProgress

    sweep = SweepConfig.from_dict(sweep_config(Path("/tmp"), "weights.pt", search={"lr": {"grid": [1e-3, 1e-2]}}))
    callback = SweepProgress.of(sweep)
    assert callback.total == 4  # a grid of two, two samples
    trials = [SimpleNamespace(status="RUNNING", config={"lr": lr}, trial_id=f"id{lr}") for lr in (1e-3, 1e-2)]
    with caplog.at_level(logging.INFO, logger="pipeline"):
        callback.on_trial_result(1, trials, trials[1], {"acr": 0.25})
        callback.on_trial_result(1, trials, trials[0], {"acr": 0.125})
        trials[1].status = "TERMINATED"
        callback.on_trial_complete(2, trials, trials[1])
        restored = pickle.loads(pickle.dumps(callback))
        callback.on_experiment_end(trials)
    assert restored._progress is None and restored.scores == {"id0.01": 0.25, "id0.001": 0.125}
    assert "sweep: 1/4 trials (25%)" in caplog.text and "running 1, best acr 0.25 (lr=0.01)" in caplog.text


def test_sweep_progress_counts_each_trial_once_and_names_the_best_the_outputs_name(tmp_path, caplog):
    """Row 81's `5/4 trials (125%)`: a resumed sweep with 3 of 4 finished whose last trial errors before any
    result counted that trial twice (once as already ended when the display started, once for its end). And
    under a tie the progress line names the earliest trial, as `best_trial` (the outputs) does; an errored
    trial is never the best shown."""
    import logging
    from types import SimpleNamespace

    from pipeline.distributed.progress import SweepProgress

    statuses = {"t001": "finished", "t002": "finished", "t003": "finished"}
    sweep, record, _ = _recorded(tmp_path, statuses, {"t001": [0.3], "t002": [0.3], "t003": [0.1]})
    callback = SweepProgress.of(sweep, record)
    assert (callback.total, callback.done) == (4, 3)
    trial = SimpleNamespace(status="ERROR", config={"trial": "t000"}, trial_id="x")
    with caplog.at_level(logging.INFO, logger="pipeline"):
        callback.on_trial_result(1, [trial], trial, {"acr": 0.9})
        callback.on_trial_error(1, [trial], trial)
        callback.on_trial_error(1, [trial], trial)  # told twice: still one trial
        callback.on_experiment_end([trial])
    lines = [line for line in caplog.text.splitlines() if "sweep: " in line]
    assert lines and all("4/4 trials (100%)" in line for line in lines[1:]) and "5/4" not in caplog.text
    lr = record.trials["t001"]["config"]["lr"]
    assert f"best acr 0.3 (lr={lr:.3g})" in lines[-1] and callback._fields([])["best"] == f"acr 0.3 (lr={lr:.3g})"
    assert best_trial({"t001": 0.3, "t002": 0.3, "t003": 0.1}) == "t001"
    # a tie reported in the other order still names the earliest trial
    later_first = SweepProgress(2, "acr", ["lr"], plan={"t000": {"lr": 1.0}, "t001": {"lr": 2.0}})
    for key in ("t001", "t000"):
        running = SimpleNamespace(status="RUNNING", config={"trial": key}, trial_id="x")
        later_first.on_trial_result(1, [running], running, {"acr": 0.5})
    assert later_first._fields([])["best"] == "acr 0.5 (lr=1)"


def test_the_best_certify_config_states_only_what_final_sets(tmp_path):
    """best_certify.yaml names the best denoiser and Cohen at the trial's sigma; output and dataset come from
    `final` when it sets them, else the run config's defaults."""
    sweep = sweep_config(tmp_path, tmp_path / "clean.pt", final={})
    train = {**sweep["train"], "sigma": 0.5}
    bare = best_certify_config(SweepConfig.from_dict(sweep), train, "best/denoiser")
    assert bare == {"run_id": "tiny-best", "model": {"name": "demo_cnn", "weights": str(tmp_path / "clean.pt"),
                                                     "denoiser": "best/denoiser"},
                    "certifiers": [{"name": "cohen", "sigma": 0.5}]}
    config = validate(bare)
    assert (config.output, config.dataset.layout, config.dataset.split) == ("runs", "demo", "test")
    final = sweep_config(tmp_path, tmp_path / "clean.pt")["final"]
    stated = best_certify_config(SweepConfig.from_dict(sweep_config(tmp_path, tmp_path / "clean.pt")), train, "d")
    assert stated["output"] == final["output"] and stated["dataset"] == final["dataset"]
    assert stated["certifiers"] == [{"name": "cohen", "sigma": 0.5, **final["certification"]}]
