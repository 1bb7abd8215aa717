"""A run's own correctness, below Ray (`pipeline.run`, in process): which (image, setting) pairs are done is
decided by setting identity from checked result files; files that are not the run's are named and refused
before the manifest or the lease is touched; error rows are retried; counts are true; failed writes,
Ctrl-C and SIGTERM end in one line with the manifest saying why. One small Ray run shows a write failing
inside an actor (the bucket deleted) reaching the user as one line."""

import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import run as lifecycle
from pipeline.config import ConfigError, validate
from pipeline.data.preprocess import Transform, decode_batch
from pipeline.engine import Engine
from pipeline.models import ModelSpec, load_model
from pipeline.results import ForeignResults, read_results
from pipeline.storage import WriteFailed, open_location

CERTIFIERS = [{"name": "cohen", "sigma": 0.25, "n0": 10, "n": 50}, {"name": "cohen", "sigma": 0.5, "n0": 10, "n": 50}]


def make(tmp_path: Path, run_id: str = "r", certifiers=None, **more):
    return validate({"certifiers": certifiers or CERTIFIERS, "output": str(tmp_path), "run_id": run_id,
                     "dataset": {"layout": "demo", "max": 4}, **more})


def certify_pending(run: lifecycle.Run, broken=(), per_file: int = 2) -> dict[str, int]:
    """What the Ray layer does, in process: batches of `per_file` images certified and written, each as its
    own file; images in `broken` fail to read, as a file moved away during the run."""
    engine = Engine(load_model(run.config.model), batch_size=256)
    counts = {"certified": 0, "failed": 0}
    for first in range(0, run.pending.num_rows, per_file):
        batch = decode_batch(run.pending.slice(first, per_file).to_pydict(), run.config.dataset.transform)
        batch["error"] = np.array([f"{i}: cannot read the file" if i in broken else error
                                   for i, error in zip(batch["image_id"], batch["error"], strict=True)], dtype=object)
        table = lifecycle.certify_batch(engine, run.certifiers, batch, run.config.seed, {**run.info, "node": "here"})
        run.results.write_parquet(lifecycle.batch_file(batch["image_id"]), table)
        counts["certified"] += len(batch["image_id"])
        counts["failed"] += len(lifecycle.error_images(table))
    return counts


def manifest(tmp_path: Path, run_id: str = "r") -> dict:
    return json.loads((tmp_path / run_id / "manifest.json").read_text())


def pairs(tmp_path: Path, run_id: str = "r") -> list[tuple[str, str, str]]:
    table = read_results(open_location(str(tmp_path / run_id / "results")))
    return sorted(zip(table["image_id"].to_pylist(), table["setting"].to_pylist(), table["status"].to_pylist(),
                      strict=True))


@pytest.fixture
def finished(tmp_path):
    """A finished run `r` of 4 demo images and two settings, two images per result file."""
    summary = lifecycle.execute(make(tmp_path), certify_pending)
    assert summary.status == "finished" and summary.results.num_rows == 8
    return tmp_path


def test_a_changed_config_without_its_manifest_is_refused_not_finished_on_the_old_rows(finished):
    """Row 55: the manifest deleted, a rerun with one setting changed was `finished` on the old rows (the
    number of settings matched). Now the rows' settings are checked against the config's, the file is
    named, and nothing is written."""
    (finished / "r" / "manifest.json").unlink()
    changed = make(finished, certifiers=[CERTIFIERS[0], {**CERTIFIERS[1], "n": 60}])
    with pytest.raises(ForeignResults, match=r"r/results/part-\w+\.parquet \(and 1 more file\(s\) like it\): holds "
                                             r"rows of setting\(s\) this config does not have: cohen\(sigma=0.5.*n=50"
                                             r".*A changed config needs another run_id"):
        lifecycle.prepare(changed)
    assert sorted(path.name for path in (finished / "r").iterdir()) == ["report", "results"]  # no manifest, no lease
    assert len(pairs(finished)) == 8


def test_files_that_are_not_this_runs_are_named_and_refused_before_the_manifest_or_the_lease(finished):
    """Rows 53, 54: a truncated Parquet, a Parquet of other columns, another run's file: each is named, and
    refused before the manifest is rewritten `running` or the lease taken (the manifest stays `finished`,
    attempt 1, and no lease.json is left)."""
    results = finished / "r" / "results"
    original = sorted(results.iterdir())[0]
    other = lifecycle.execute(make(finished, run_id="other"), certify_pending)
    planted = {
        "part-truncated.parquet": (original.read_bytes()[:200], "cannot be read as Parquet"),
        "part-columns.parquet": (None, r"is not a result file of this project \(columns \['x'\] unknown"),
        "part-other.parquet": ((finished / "other" / "results" / sorted(
            os.listdir(finished / "other" / "results"))[0]).read_bytes(), r"holds rows of run\(s\) \['other'\]"),
    }
    assert other.status == "finished"
    for name, (data, message) in planted.items():
        if data is None:
            pq.write_table(pa.table({"x": [1, 2]}), results / name)
        else:
            (results / name).write_bytes(data)
        with pytest.raises(ForeignResults, match=rf"r/results/{name}: {message}.*must be moved out of"):
            lifecycle.execute(make(finished), certify_pending)
        written = manifest(finished)
        assert (written["status"], written["attempts"]) == ("finished", 1)
        assert not (finished / "r" / "lease.json").exists()
        (results / name).unlink()
    assert lifecycle.execute(make(finished), certify_pending).counts["already_done"] == 4


def test_a_damaged_manifest_is_named_and_the_run_folder_left_as_it_was(finished):
    """Row 58: `Expecting value: line 2 column 1 (char 34)` did not name the file."""
    (finished / "r" / "manifest.json").write_text('{"run_id": "r",\n')
    with pytest.raises(ValueError, match=r"r/manifest.json is damaged: not a run manifest \(Expecting .*line 2.*\); "
                                         r"restore it, or remove it"):
        lifecycle.prepare(make(finished))
    assert not (finished / "r" / "lease.json").exists()
    (finished / "r" / "manifest.json").unlink()  # as the message says: the rows are checked instead
    assert lifecycle.execute(make(finished), certify_pending).counts["already_done"] == 4


def test_a_run_refused_before_any_work_leaves_no_folder(tmp_path):
    with pytest.raises(ValueError, match="class scores"):
        lifecycle.prepare(validate({"certifiers": CERTIFIERS, "output": str(tmp_path / "out" / "runs"),
                                    "model": {"name": "resnet18", "num_classes": 1}}))
    assert list(tmp_path.iterdir()) == []


def test_error_rows_are_retried_and_every_pair_is_written_once(tmp_path):
    """Row 61: an image that could not be read had error rows for good. Now it is pending on the rerun, its
    error rows are removed from the file that holds them (with the other image's rows kept) and its new rows
    written once; the counts of both attempts say what failed."""
    first = lifecycle.execute(make(tmp_path), lambda run: certify_pending(run, broken={"digits/0006"}))
    assert first.counts["failed"] == 1 and first.counts["error_rows"] == 2
    before = pairs(tmp_path)
    assert [row[2] for row in before].count("error") == 2

    rerun = lifecycle.prepare(make(tmp_path))
    assert rerun.pending["image_id"].to_pylist() == ["digits/0006"]
    assert len(pairs(tmp_path)) == 6  # its two error rows are gone; the other image of its file kept its rows
    counts = certify_pending(rerun)
    summary = lifecycle.finish(rerun, {**counts, "listed": 4, "already_done": 3})
    after = pairs(tmp_path)
    assert len(after) == 8 and len({row[:2] for row in after}) == 8 and {row[2] for row in after} == {"ok"}
    assert summary.counts["failed"] == 0 and summary.counts["error_rows"] == 0 and manifest(tmp_path)["attempts"] == 2


def test_done_means_an_ok_row_for_every_configured_setting():
    settings = ["a", "b"]
    keys = pa.table({"image_id": ["x", "x", "y", "y", "z", "z", "z"], "setting": ["a", "b", "a", "b", "a", "c", "d"],
                     "status": ["ok", "ok", "ok", "error", "ok", "ok", "ok"]})
    assert lifecycle.done_image_ids(keys, settings) == {"x"}  # y: an error row; z: two settings, not the two


def test_finish_checks_the_exact_pairs_and_names_the_files_of_a_duplicate(finished):
    run = lifecycle.prepare(make(finished))
    results = finished / "r" / "results"
    shutil.copy(sorted(results.iterdir())[0], results / "part-copy.parquet")
    with pytest.raises(RuntimeError, match=r"4 \(image, setting\) pairs have more than one row, e.g. .* in "
                                           r"\['part-\w+\.parquet', 'part-copy\.parquet'\]"):
        lifecycle.finish(run, {})


def test_failed_counts_every_image_with_error_rows():
    """Rows 13, 71: a label outside the model's classes (or non-finite outputs) made error rows, yet the
    progress and the manifest said "0 failed": only decoding failures were counted."""
    from test_reliability import png

    good = png(np.full((32, 32, 3), 128, dtype=np.uint8))
    batch = decode_batch({"index": [0, 1, 2], "image_id": ["a", "b", "c"], "label": [99, 3, 1],
                          "image": [good, good, b"not an image"]}, Transform(size=32))
    engine = Engine(load_model(ModelSpec()), batch_size=256)
    certifiers = validate({"certifiers": CERTIFIERS}).certifiers
    table = lifecycle.certify_batch(engine, certifiers, batch, 0, {})
    assert lifecycle.error_images(table) == {"a", "c"}

    from pipeline.distributed.certify import CertifyActor

    actor = object.__new__(CertifyActor)  # its batch step, without the Ray actor around it
    actor.engine, actor.certifiers, actor.seed, actor.run_info = engine, certifiers, 0, {}
    written = []
    actor.results = type("Sink", (), {"write_parquet": lambda self, name, rows: written.append(rows)})()
    assert actor(batch)["failed"].tolist() == [True, False, True] and written[0].num_rows == 6


def test_a_failed_write_is_one_line_and_partial_files_are_removed(tmp_path):
    """Rows 37, 63: a write that fails for good (here: the results folder replaced by a file; a full disk or
    a deleted bucket alike) ended in a Ray traceback and left `.partial` files. Now it is one line naming the
    file, the manifest says failed with that line, and the next start removes partial files."""
    def unwritable(run: lifecycle.Run) -> dict:
        results = Path(run.results.path)
        shutil.rmtree(results, ignore_errors=True)
        results.write_text("not a folder")
        return certify_pending(run)

    with pytest.raises(WriteFailed) as stopped:
        lifecycle.execute(make(tmp_path), unwritable)
    message = str(stopped.value)
    assert message.startswith("run r stopped: cannot write ") and "\n" not in message
    assert "fix the storage (space, bucket, permissions), then rerun the same command" in message
    written = manifest(tmp_path)
    assert written["status"] == "failed" and written["reason"].startswith("WriteFailed: cannot write ")
    assert not (tmp_path / "r" / "lease.json").exists()

    (tmp_path / "r" / "results").unlink()
    (tmp_path / "r" / "results").mkdir()
    (tmp_path / "r" / "results" / ".part-x.parquet.0123.partial").write_bytes(b"half")
    (tmp_path / "r" / ".manifest.json.0123.partial").write_bytes(b"")
    assert lifecycle.execute(make(tmp_path), certify_pending).status == "finished"
    assert not list((tmp_path / "r").rglob("*.partial"))


def test_manifest_reasons_are_one_line_without_colour_codes():
    class TaskError(RuntimeError):
        pass

    ray_text = ("\x1b[36mray::MapWorker(CertifyActor)\x1b[39m (pid=1, ip=127.0.0.1)\nTraceback (most recent call "
                "last):\n  File \"x.py\", line 1, in f\n"
                "\x1b[31mNotImplementedError: Unknown pixel format flags 0\x1b[0m\n")
    assert lifecycle.reason_of(TaskError(ray_text)) == "NotImplementedError: Unknown pixel format flags 0"
    assert lifecycle.reason_of(KeyError("k")) == "KeyError: 'k'"


@pytest.mark.parametrize(("how", "code", "said"), [("ctrl-c", 130, "Ctrl-C (SIGINT)"), ("sigterm", 143, "SIGTERM")])
def test_ctrl_c_and_sigterm_mark_the_manifest_interrupted(tmp_path, how, code, said):
    """Rows 59, 60: the manifest stayed `running` with no reason. Now it says `interrupted` and why, the lease
    is released, and the exception carries the exit code (130, 143) with one line; the rerun completes."""
    def stopped(run: lifecycle.Run) -> dict:
        certify_pending(run.__class__(**{**run.__dict__, "pending": run.pending.slice(0, 2)}))
        if how == "ctrl-c":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(0.05)
        raise AssertionError("SIGTERM did not stop the run")

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(lifecycle.Interrupted) as interrupted, lifecycle.stop_on_sigterm():
        lifecycle.execute(make(tmp_path), stopped)
    assert signal.getsignal(signal.SIGTERM) == before
    assert interrupted.value.exit_code == code
    assert str(interrupted.value) == (f"run r interrupted by {said}; its manifest says interrupted; rerun the same "
                                      f"command to go on where it stopped")
    written = manifest(tmp_path)
    assert (written["status"], written["reason"]) == ("interrupted", f"interrupted by {said}")
    assert not (tmp_path / "r" / "lease.json").exists()
    assert lifecycle.execute(make(tmp_path), certify_pending).counts["already_done"] == 2


def test_model_settings_that_would_not_be_applied_are_refused():
    """Row 66: weights "", [], 0, false; row 23: num_classes on demo_cnn's shipped 10-class weights."""
    for weights in ("", [], 0, False):
        with pytest.raises(ConfigError, match=r"model\.weights"):
            validate({"certifiers": CERTIFIERS, "model": {"weights": weights}})
    with pytest.raises(ConfigError, match=r"model\.num_classes: demo_cnn's shipped weights have 10 classes, got 5"):
        validate({"certifiers": CERTIFIERS, "model": {"num_classes": 5}})
    assert validate({"certifiers": CERTIFIERS, "model": {"num_classes": 10}}).model.num_classes == 10


def test_a_bucket_deleted_before_the_actors_write_ends_in_one_line(ray_cluster, s3_endpoint, tmp_path):
    """Row 37, on Ray: the write fails inside the actor (NO_SUCH_BUCKET), which Ray reports as a task error
    with a traceback; the user gets one line naming the file, and no traceback."""
    import boto3

    from pipeline.distributed.certify import certify_pending as on_ray

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="vanishing")
    config = make(tmp_path, certifiers=CERTIFIERS[:1], output="s3://vanishing/runs",
                  storage={"endpoint_url": s3_endpoint, "retry_seconds": 1}, actors={"count": 1, "cpus": 1})

    def delete_bucket_then_certify(run: lifecycle.Run) -> dict:
        for item in s3.list_objects_v2(Bucket="vanishing").get("Contents", []):
            s3.delete_object(Bucket="vanishing", Key=item["Key"])
        s3.delete_bucket(Bucket="vanishing")
        return on_ray(run)

    with pytest.raises(WriteFailed) as stopped:
        lifecycle.execute(config, delete_bucket_then_certify)
    message = str(stopped.value)
    assert message.startswith("run r stopped: cannot write s3://vanishing/runs/r/results/part-")
    assert "\n" not in message and "Traceback" not in message and "\x1b" not in message


def test_pipeline_report_names_a_file_that_is_not_a_result_file(finished, capsys):
    """Row 53 (`pipeline report`: a raw ArrowInvalid traceback) and row 54b (a Parquet of other columns read
    as rows with null settings, then a TypeError in the report writer)."""
    from pipeline import cli

    results = finished / "r" / "results"
    cut = sorted(results.iterdir())[0].read_bytes()[:200]
    for name, data, problem in [("part-cut.parquet", cut, "cannot be read as result rows"),
                                ("part-other.parquet", None, "it lacks the result column")]:
        if data is None:
            pq.write_table(pa.table({"x": [1, 2]}), results / name)
        else:
            (results / name).write_bytes(data)
        assert cli.main(["report", str(finished / "r")]) == 2
        said = capsys.readouterr().err.strip()
        assert said.startswith(f"pipeline: {results / name} is not a file of result rows ({problem}")
        assert said.endswith(f"; move it out of {results} or delete it") and "\n" not in said
        (results / name).unlink()
    assert cli.main(["report", str(finished / "r")]) == 0


def test_rows_of_images_the_dataset_no_longer_lists_are_named_in_a_warning(finished, caplog):
    (finished / "r" / "manifest.json").unlink()
    with caplog.at_level("WARNING", logger="pipeline.run"):
        run = lifecycle.prepare(make(finished, dataset={"layout": "demo", "max": 2}))
    assert run.pending.num_rows == 0
    assert "holds rows of 2 image(s) the dataset no longer lists (e.g. digits/0012, digits/0018)" in caplog.text
    run.lease.release()
