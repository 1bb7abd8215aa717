"""Nothing silently wrong, no run blocked by one bad input: non-finite models, deep and huge images, odd
file names, labels the model cannot have, lost result files, and the messages of bad configs."""

import io
import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import png_header
from PIL import Image
from torch import nn

import pipeline
from pipeline import run as lifecycle
from pipeline.certifiers import DSSN, Center, Cohen, TopK
from pipeline.config import ConfigError, DenoiserConfig, load_config, validate
from pipeline.data.preprocess import ImageError, Transform, decode, decode_batch
from pipeline.data.sources import DatasetSpec, list_images
from pipeline.engine import Engine
from pipeline.models import ModelSpec, load_model
from pipeline.models.denoisers import load_denoiser
from pipeline.storage import StorageOutage
from pipeline.sweeps import SweepConfig, load_sweep

ROOT = Path(__file__).resolve().parents[1]


class NaNWhereBright(nn.Module):
    """Two class scores from the mean pixel, NaN wherever the mean pixel exceeds `threshold`."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold

    def forward(self, x):
        mean = x.flatten(1).mean(dim=1)
        scores = torch.stack([10 * mean, 10 * (1 - mean)], dim=1)
        return torch.where((mean > self.threshold)[:, None], torch.full_like(scores, float("nan")), scores)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_non_finite_outputs_never_vote():
    """NaN scores argmax to class 0; counted, they certified class 0 at the largest radius (DSSN "with
    certainty"). Now an image with any non-finite output under noise has an error row for every
    certifier, and the other images are certified as before."""
    images = torch.full((2, 1, 4, 4), 77 / 255)  # on DSSN's grid
    images[1] = 1.0
    everywhere = pipeline.certify(NaNWhereBright(-1.0), images, [1, 0], [
        Cohen(sigma=0.25, n0=20, n=200), DSSN(sigma=0.5), TopK(sigma=0.25, k=1, n=200)]).to_pylist()
    assert all(row["status"] == "error" and "NaN or infinite outputs" in row["error"] for row in everywhere)
    assert all(row["radius"] == 0.0 and row["correct"] is False for row in everywhere)

    certifiers = [Cohen(sigma=0.25, n0=20, n=200), TopK(sigma=0.25, k=1, n=200),
                  Cohen(sigma=0.25, n0=20, n=2000, mode="sequential", radii=[0.25])]
    rows = pipeline.certify(NaNWhereBright(0.65), images, [1, 0], certifiers).to_pylist()  # noise std of the mean:
    assert [row["status"] for row in rows] == ["ok"] * 3 + ["error"] * 3  # 0.0625, so 5.6 of them each side
    finite = pipeline.certify(NaNWhereBright(5.0), images[:1], [1], certifiers).to_pylist()
    assert [row["radius"] for row in rows[:3]] == [row["radius"] for row in finite] and finite[0]["radius"] > 0

    outputs = pipeline.certify(NaNWhereBright(0.65), images, None, [
        Center(sigma=0.25, eps_in=0.1, output="logits", n=2000, m=2000)]).to_pylist()
    assert outputs[1]["status"] == "error" and outputs[1]["eps_out"] is None


def test_a_model_that_is_not_finite_or_has_the_wrong_shape_is_refused_before_work(tmp_path):
    certifiers = [Cohen(sigma=0.25)]
    with pytest.raises(ValueError, match="NaN or infinite scores on a clean input"):
        lifecycle.check_model(NaNWhereBright(-1.0), (1, 4, 4), certifiers)
    with pytest.raises(ValueError, match=r"class scores \[B, num_classes >= 2\]; it returned shape \(1, 1\)"):
        lifecycle.prepare(validate({"certifiers": [{"name": "cohen", "sigma": 0.25}], "output": str(tmp_path),
                                    "model": {"name": "resnet18", "num_classes": 1}}))
    with pytest.raises(ConfigError, match=r"model\.std must hold finite numbers > 0"):
        validate({"certifiers": [{"name": "cohen", "sigma": 0.25}], "model": {"name": "resnet18", "std": [0, 0, 0]}})
    assert not (tmp_path / "demo" / "manifest.json").exists()  # no run started before the model was checked


def test_sixteen_bit_images_are_scaled_not_clipped():
    deep = np.linspace(0, 65535, 48 * 48).round().astype(np.uint16).reshape(48, 48)
    pixels = decode(png(deep), Transform(size=48))
    expected = np.rint(deep / 257).astype(np.uint8)
    assert (pixels == expected[None]).all()  # replicated to the 3 channels, values 0..255 as in the source
    assert (pixels == 255).mean() < 0.01  # clipping at 255 made 99.6% of such an image white
    float_image = io.BytesIO()
    Image.fromarray(np.ones((8, 8), dtype=np.float32)).save(float_image, format="TIFF")
    with pytest.raises(ImageError, match="floating-point pixels"):
        decode(float_image.getvalue(), Transform(size=8))


def test_huge_and_unidentifiable_images_are_error_rows_and_the_batch_goes_on():
    with pytest.raises(ImageError, match="too large to decode safely"):
        decode(png_header(15000, 15000), Transform(size=32))
    with pytest.raises(ImageError, match=r"image is 64x64 = 4,096 pixels, above the cap of 1,000"):
        decode(png(np.zeros((64, 64, 3), dtype=np.uint8)), Transform(size=32, max_pixels=1000))
    with pytest.raises(ImageError, match="cannot identify an image in the file") as caught:
        decode(b"plain text", Transform(size=32))
    assert "0x" not in str(caught.value)
    with pytest.raises(ImageError, match="the file is empty"):
        decode(b"", Transform(size=32))

    good = png(np.full((32, 32, 3), 128, dtype=np.uint8))
    batch = decode_batch({"index": [0, 1], "image_id": ["bomb.png", "good.png"], "label": [0, 0],
                          "image": [png_header(15000, 15000), good]}, Transform(size=32))
    engine = Engine(load_model(ModelSpec()), batch_size=256)
    table = lifecycle.certify_batch(engine, [Cohen(sigma=0.25, n0=10, n=50)], batch, 0, {})
    assert table["status"].to_pylist() == ["error", "ok"] and "bomb.png" in table["error"][0].as_py()


def test_file_names_that_are_not_utf8_are_skipped_with_a_warning(tmp_path, caplog):
    folder = tmp_path / "n01440764"
    folder.mkdir()
    (folder / "good.png").write_bytes(png(np.zeros((8, 8, 3), dtype=np.uint8)))
    with open(os.path.join(os.fsencode(folder), b"bad\xff\xfename.png"), "wb") as handle:
        handle.write(b"x")
    with caplog.at_level(logging.WARNING, logger="pipeline.data.sources"):
        listing = list_images(DatasetSpec(layout="imagenet_folder", root=str(tmp_path), size=8))
    assert listing["image_id"].to_pylist() == ["good.png"]
    assert "skipped 1 file(s) whose names are not valid UTF-8" in caplog.text and "\\xff\\xfe" in caplog.text


def test_a_label_the_model_cannot_have_is_an_error_row():
    good = png(np.full((32, 32, 3), 128, dtype=np.uint8))
    batch = decode_batch({"index": [0, 1], "image_id": ["a", "b"], "label": [99, 3], "image": [good, good]},
                         Transform(size=32))
    engine = Engine(load_model(ModelSpec()), batch_size=256)
    table = lifecycle.certify_batch(engine, [Cohen(sigma=0.25, n0=10, n=50)], batch, 0, {}).to_pylist()
    assert [row["status"] for row in table] == ["error", "ok"]
    assert table[0]["error"] == "a: label 99 is outside the model's classes 0..9" and table[0]["label"] == 99


def test_a_lost_results_file_makes_the_run_incomplete_and_a_rerun_fills_it(tmp_path):
    """The run lifecycle below Ray: batches certified and written, one file lost before the end. `finish`
    names the missing images and marks the manifest incomplete; the rerun's pending images are exactly
    those, and its end is complete."""
    config = validate({"certifiers": [{"name": "cohen", "sigma": 0.25, "n0": 10, "n": 50}], "output": str(tmp_path),
                       "dataset": {"layout": "demo", "max": 6}, "run_id": "lost"})

    def certify_pending(run: lifecycle.Run) -> list[str]:
        engine = Engine(load_model(config.model), batch_size=256)
        names = []
        for first in range(0, run.pending.num_rows, 3):
            batch = decode_batch(run.pending.slice(first, 3).to_pydict(), config.dataset.transform)
            names.append(lifecycle.batch_file(batch["image_id"]))
            run.results.write_parquet(names[-1], lifecycle.certify_batch(engine, run.certifiers, batch, 0, run.info))
        return names

    run = lifecycle.prepare(config)
    files = certify_pending(run)
    lost = run.results.join(files[0])
    Path(lost.path).unlink()
    with pytest.raises(lifecycle.IncompleteRun, match=r"3 of 6 listed images have no rows for every setting"):
        lifecycle.finish(run, {})
    assert json.loads((tmp_path / "lost" / "manifest.json").read_text())["status"] == "incomplete"

    rerun = lifecycle.prepare(config)
    assert rerun.pending.num_rows == 3
    certify_pending(rerun)
    lifecycle.finish(rerun, {})
    assert json.loads((tmp_path / "lost" / "manifest.json").read_text())["status"] == "finished"


def test_a_run_that_stops_marks_its_manifest_and_an_outage_in_its_chain_is_one_line(tmp_path):
    """`pipeline.run.execute`'s failure policy below Ray: an outage found anywhere in the error's chain (a
    cause, a context, the `cause` a task error carries) fails the run in one line and marks the manifest
    failed; any other error passes through as it is, also marking it; the lease is released either way, so
    a rerun of the id finishes the run and says how many images it certified."""
    config = validate({"certifiers": [{"name": "cohen", "sigma": 0.25, "n0": 10, "n": 50}], "output": str(tmp_path),
                       "dataset": {"layout": "demo", "max": 3}, "run_id": "stops"})

    class TaskError(RuntimeError):  # what a distributed runner raises: the task's error as `cause`, text around it
        def __init__(self, cause: BaseException):
            super().__init__(f"task failed:\n{cause!r}\n  traceback ...")
            self.cause = cause

    def wrapped_outage(run: lifecycle.Run) -> dict:
        try:
            raise StorageOutage("s3://bucket unreachable for 3 s")
        except StorageOutage as outage:
            raise TaskError(outage) from None

    def broken(run: lifecycle.Run) -> dict:
        raise KeyError("not an outage")

    manifest = tmp_path / "stops" / "manifest.json"
    with pytest.raises(StorageOutage) as stopped:
        lifecycle.execute(config, wrapped_outage)
    assert str(stopped.value) == ("run stops stopped: s3://bucket unreachable for 3 s; rerun the same command to go "
                                  "on where it stopped")
    assert json.loads(manifest.read_text())["reason"] == "StorageOutage: s3://bucket unreachable for 3 s"
    with pytest.raises(KeyError, match="not an outage"):
        lifecycle.execute(config, broken)
    assert json.loads(manifest.read_text())["status"] == "failed"
    assert lifecycle.outage_behind(RuntimeError("in the text only: StorageOutage: x")) is None

    def certify_pending(run: lifecycle.Run) -> dict:
        engine = Engine(load_model(config.model), batch_size=256)
        batch = decode_batch(run.pending.to_pydict(), config.dataset.transform)
        run.results.write_parquet(lifecycle.batch_file(batch["image_id"]),
                                  lifecycle.certify_batch(engine, run.certifiers, batch, 0, {**run.info, "node": "n"}))
        return {"certified": run.pending.num_rows, "failed": 0}

    summary = lifecycle.execute(config, certify_pending)
    written = json.loads(manifest.read_text())
    assert summary.status == written["status"] == "finished" and written["attempts"] == 3
    assert summary.counts == written["counts"] and summary.counts["certified"] == 3 == summary.results.num_rows
    assert written["batch"] == [{"node": "n", "size": 256, "chosen_by": "config"}]  # from the rows' params
    assert summary.uri == str(tmp_path / "stops") and "Certified accuracy" in summary.brief


def test_bad_configs_and_files_get_one_line_messages(tmp_path):
    demo = ROOT / "jobs" / "configs" / "demo.yaml"
    config = load_config(demo, ["certifiers.0.n=1e5"])
    assert config.certifiers[0].n == 100_000  # YAML 1.1 would read 1e5 as a string
    with pytest.raises(ConfigError, match=r"storage: unknown key\(s\) \['access_key'\]"):
        load_config(demo, ["storage.access_key=x"])
    with pytest.raises(ConfigError, match=r"--set .*the value is not valid YAML"):
        load_config(demo, ["certifiers=[{name: cohen"])
    with pytest.raises(ConfigError, match=r"dataset\.mode: unknown image mode 'XYZ'"):
        load_config(demo, ["dataset.mode=XYZ"])
    with pytest.raises(ConfigError, match=r"dataset\.mode L has 1 channel\(s\), but dataset\.channels is 3"):
        load_config(demo, ["dataset.mode=L"])

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="the file is empty"):
        load_model(ModelSpec(weights=str(empty)))
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "artifact.json").write_text("{}")
    (artifact / "denoiser.pt").write_bytes(pickle.dumps({"not": "torch"}) + b"garbage")
    with pytest.raises(ValueError, match="cannot load a denoiser artifact from"):
        load_denoiser(str(artifact))

    training = {"classifier": {"name": "demo_cnn"}}
    for key, value, message in [("workers", -1, "workers must be an integer >= 0"),
                                ("lr", -0.1, "lr must be a number > 0"),
                                ("denoiser", {"depth": -3}, r"denoiser\.depth must be an integer >= 3"),
                                ("subset", {"fraction": 2}, r"subset\.fraction must lie in \(0, 1\]")]:
        with pytest.raises(ConfigError, match=message):
            DenoiserConfig.from_dict({**training, key: value})
    sweep = {"train": training, "search": {"lr": {"choice": [0.1]}}, "objective": {"metric": "acr"}}
    with pytest.raises(ConfigError, match="num_samples must be an integer >= 1"):
        SweepConfig.from_dict({**sweep, "num_samples": 0})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**sweep, "train": str(ROOT / "jobs" / "configs" / "denoiser_demo.yaml")}))
    assert load_sweep(path, ["train.epochs=3"]).train["epochs"] == 3  # overrides reach a train config by path


def test_names_that_become_paths_cannot_leave_their_roots(tmp_path, capsys):
    """A run id, a training run name, a sweep name, a nightly label or date is one path segment: '..', a
    separator or a hidden name is refused before anything is written, and no join leaves its root."""

    from pipeline import cli
    from pipeline.storage import Storage, StorageError

    output = tmp_path / "runs"
    for run_id in ("..", "../escape", "a/b", ".hidden", ""):
        assert cli.main(["certify", "--config", str(ROOT / "jobs" / "configs" / "demo.yaml"), "--output", str(output),
                         "--run-id", run_id]) == 2
        assert "run_id must be letters, digits" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="run_name must be letters"):
        DenoiserConfig.from_dict({"classifier": {"name": "demo_cnn"}, "run_name": "../den-esc"})
    with pytest.raises(ConfigError, match="name must be letters"):
        SweepConfig.from_dict({"name": "../sweep-esc", "train": {"classifier": {"name": "demo_cnn"}},
                               "search": {"lr": {"choice": [0.1]}}, "objective": {"metric": "acr"}})
    with pytest.raises(StorageError, match="is not one path segment"):
        Storage().open(str(tmp_path)).join("..", "escape")
    with pytest.raises(SystemExit) as exit_code:
        cli.main(["nightly", "--config", str(ROOT / "jobs" / "configs" / "nightly_demo.yaml"), "--date",
                  "../../esc-night"])
    assert exit_code.value.code == 2 and "expected a date YYYY-MM-DD" in capsys.readouterr().err
