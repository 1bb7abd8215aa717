"""Sweeps on Ray Tune: a tiny ASHA sweep end to end, resuming an interrupted one, clear errors."""

import contextlib
import json
import os
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
from pipeline.config import ConfigError, SweepConfig, load_sweep
from pipeline.distributed.tune import run_sweep

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clean_classifier(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "jobs"))
    from train_demo_model import main as train_classifier

    path = tmp_path_factory.mktemp("classifier") / "clean.pt"
    train_classifier(["--noise", "none", "--epochs", "8", "--output", str(path)])
    return path


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


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_cluster, clean_classifier, tmp_path):
    sweep = sweep_config(tmp_path, clean_classifier, max_concurrent=1, scheduler={"name": "fifo"})
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(sweep))
    job = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "sweep.py"), "--config", str(config)],
                           env={**os.environ, "RAY_ADDRESS": ray_cluster, "TUNE_GLOBAL_CHECKPOINT_S": "0"},
                           cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = tmp_path / "sweeps" / "tiny"

    def epochs(path: Path) -> list[int]:
        reported = []
        for line in path.read_text().splitlines():  # a file being copied may end in a partial line
            with contextlib.suppress(ValueError, KeyError):
                reported.append(json.loads(line)["epoch"])
        return reported

    def finished() -> dict[Path, list[int]]:
        return {path: epochs(path) for path in results.glob("*/result.json") if epochs(path)[-1:] == [4]}

    deadline, before = time.monotonic() + 400, {}
    while time.monotonic() < deadline and not before:
        assert job.poll() is None, "the sweep ended before it could be interrupted"
        time.sleep(0.2)
        before = finished()
    assert before, "no trial finished within 400 s"
    time.sleep(1.5)  # let the experiment state be written
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert len(before) < 4

    run_sweep(load_sweep(config))
    trials = pd.read_parquet(results / "trials.parquet")
    assert len(trials) == 4 and set(trials["status"]) == {"finished"}
    assert {path: epochs(path) for path in before} == before  # no epoch of a finished trial ran again


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
    trials = [SimpleNamespace(status="RUNNING", config={"lr": lr}) for lr in (1e-3, 1e-2)]
    with caplog.at_level(logging.INFO, logger="pipeline"):
        callback.on_trial_result(1, trials, trials[1], {"acr": 0.25})
        callback.on_trial_result(1, trials, trials[0], {"acr": 0.125})
        trials[1].status = "TERMINATED"
        callback.on_trial_complete(2, trials, trials[1])
        restored = pickle.loads(pickle.dumps(callback))
        callback.on_experiment_end(trials)
    assert restored._progress is None and restored._best == (0.25, {"lr": 1e-2})
    assert "sweep: 1/4 trials (25%)" in caplog.text and "running 1, best acr 0.25 (lr=0.01)" in caplog.text
