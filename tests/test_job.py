"""The distributed certification job on a local Ray instance: layouts, object storage, resume, bad input."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import png_header
from PIL import Image
from scipy.io import savemat

from pipeline.config import validate
from pipeline.data.sources import list_images
from pipeline.distributed.certify import run
from pipeline.results import read_results
from pipeline.storage import StorageError, open_location

ROOT = Path(__file__).resolve().parents[1]
WNIDS = ["n01440764", "n01443537", "n02102040"]  # sorted: class indices 0, 1, 2
RUN_SPECIFIC = ["wall_time_s", "run_id", "node"]


def jpeg(rng, size, mode="RGB") -> bytes:
    channels = {"RGB": 3, "L": 1}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8).squeeze()
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """Nine small JPEGs in the three ImageNet layouts, with both ground-truth conventions and a devkit meta.mat."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    names = [f"ILSVRC2012_val_{i:08d}" for i in range(1, 10)]
    labels = [i % 3 for i in range(9)]
    images = {name: jpeg(rng, (int(rng.integers(40, 60)), int(rng.integers(40, 60)))) for name in names}
    (root / "flat").mkdir()
    for name, label in zip(names, labels, strict=True):
        (root / "folder" / WNIDS[label]).mkdir(parents=True, exist_ok=True)
        (root / "folder" / WNIDS[label] / f"{name}.JPEG").write_bytes(images[name])
        (root / "flat" / f"{name}.JPEG").write_bytes(images[name])
    # LOC_val_solution.csv: wnid first in PredictionString, then a box
    rows = [f"{name},{WNIDS[label]} 1 2 30 40" for name, label in zip(names, labels, strict=True)]
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    # devkit: ILSVRC2012_IDs in an order unlike the sorted wnids, plus a non-leaf synset that must be ignored
    ilsvrc_id = {WNIDS[2]: 1, WNIDS[0]: 2, WNIDS[1]: 3}
    synsets = np.zeros(4, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    for i, (wnid, number) in enumerate(ilsvrc_id.items()):
        synsets[i] = (number, wnid, 0)
    synsets[3] = (1001, "n00001740", 2)
    savemat(root / "meta.mat", {"synsets": synsets})
    (root / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "\n".join(str(ilsvrc_id[WNIDS[label]]) for label in labels) + "\n")
    table = pa.table({"image": [images[n] for n in names], "label": labels, "image_id": [f"{n}.JPEG" for n in names]})
    (root / "shards").mkdir()
    pq.write_table(table.slice(0, 5), root / "shards" / "part-0.parquet")
    pq.write_table(table.slice(5), root / "shards" / "part-1.parquet")
    return root


def config(output, dataset, run_id="run", **overrides):
    data = {
        "run_id": run_id, "output": str(output), "seed": 0, "batch_size": 256, "images_per_batch": 4,
        "actors": {"count": 1, "cpus": 1},
        "dataset": {"resize": 36, "size": 32, **dataset},
        "model": {"name": "demo_cnn"},
        "certifiers": [{"name": "cohen", "sigma": 0.25, "n0": 20, "n": 100},
                       {"name": "topk", "k": 2, "sigma": 0.25, "n": 100}],
    }
    data.update(overrides)
    return validate(data)


def rows(uri, storage=None):
    table = read_results(open_location(uri, **(storage or {})).join("results"))
    return table.drop(RUN_SPECIFIC).sort_by([("image_id", "ascending"), ("setting", "ascending")]).to_pylist()


@pytest.fixture(scope="module")
def folder_rows(ray_cluster, imagenet, tmp_path_factory):
    """The rows of one run over the ImageNet folder layout, for the tests that compare other sources with it."""
    output = tmp_path_factory.mktemp("folder_run")
    return rows(run(config(output, {"layout": "imagenet_folder", "root": str(imagenet / "folder")})).uri)


def test_every_layout_gives_the_same_rows(folder_rows, imagenet, tmp_path):
    """The folder and parquet layouts through the job give the same rows; the flat layouts (the same files
    with either ground-truth convention) list the same images with the same labels, in their own order."""
    assert len(folder_rows) == 18 and all(row["status"] == "ok" for row in folder_rows)
    assert [row["label"] for row in folder_rows[::2]] == [i % 3 for i in range(9)]
    assert {row["image_index"] for row in folder_rows} == set(range(9))
    parquet = rows(run(config(tmp_path, {"layout": "parquet", "root": str(imagenet / "shards")}, run_id="parquet")).uri)
    assert [{**row, "image_index": 0} for row in parquet] == [{**row, "image_index": 0} for row in folder_rows]

    def listed(dataset: dict) -> list[tuple]:
        listing = list_images(config(tmp_path, dataset).dataset).to_pylist()
        return sorted((row["image_id"], row["label"], Path(row["path"]).read_bytes()) for row in listing)

    folder = listed({"layout": "imagenet_folder", "root": str(imagenet / "folder")})
    flat = {"layout": "imagenet_val", "root": str(imagenet / "flat")}
    assert listed({**flat, "ground_truth": str(imagenet / "LOC_val_solution.csv")}) == folder
    assert listed({**flat, "ground_truth": str(imagenet / "ILSVRC2012_validation_ground_truth.txt"),
                   "meta": str(imagenet / "meta.mat")}) == folder


def test_subsample_follows_the_papers_skip_and_max(imagenet, tmp_path):
    dataset = {"layout": "imagenet_folder", "root": str(imagenet / "folder"), "skip": 2, "max": 7}
    listing = list_images(config(tmp_path, dataset).dataset)
    # dataset order is sorted by path: wnid folder, then file name
    order = sorted(f"{WNIDS[i % 3]}/ILSVRC2012_val_{i + 1:08d}.JPEG" for i in range(9))
    expected = {order[i].split("/")[1]: i for i in (0, 2, 4, 6)}
    assert dict(zip(listing["image_id"].to_pylist(), listing["index"].to_pylist(), strict=True)) == expected


def test_results_in_object_storage_equal_the_local_run(ray_cluster, s3_endpoint, imagenet, tmp_path):
    bucket = f"runs-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    dataset = {"layout": "demo", "max": 6}
    certifiers = [{"name": "cohen", "sigma": 0.25, "n0": 20, "n": 100},
                  {"name": "cohen", "sigma": 0.25, "n0": 20, "n": 2000, "mode": "sequential", "radii": [0.25, 0.5]}]
    local = run(config(tmp_path, dataset, certifiers=certifiers)).uri
    storage = {"endpoint_url": s3_endpoint}
    remote = run(config(f"s3://{bucket}/prefix", dataset, storage=storage, certifiers=certifiers)).uri
    assert remote == f"s3://{bucket}/prefix/run"
    assert rows(remote, storage) == rows(local)
    sequential = [row for row in rows(local) if "sequential" in row["setting"]]
    assert len(sequential) == 6 and min(row["n"] for row in sequential) < 2000  # stopped before the budget
    listed = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=bucket, Prefix="prefix/run/")
    keys = {item["Key"].removeprefix("prefix/run/") for item in listed["Contents"]}
    assert {"manifest.json", "report/summary.md", "report/curves_l2.png"} <= keys


def test_reads_an_imagenet_folder_from_object_storage(folder_rows, s3_endpoint, imagenet, tmp_path):
    bucket = f"data-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=bucket)
    for path in (imagenet / "folder").rglob("*.JPEG"):
        client.upload_file(str(path), bucket, f"val/{path.relative_to(imagenet / 'folder')}")
    storage = {"endpoint_url": s3_endpoint}
    remote = rows(run(config(tmp_path, {"layout": "imagenet_folder", "root": f"s3://{bucket}/val"}, run_id="remote",
                             storage=storage)).uri)
    assert len(remote) == 18 and remote == folder_rows


def test_missing_bucket_fails_before_any_work(ray_cluster, s3_endpoint, tmp_path):
    cfg = config(f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/runs", {"layout": "demo", "max": 4},
                 storage={"endpoint_url": s3_endpoint})
    with pytest.raises(StorageError, match=r"bucket 'no-such-bucket-\w+' does not exist"):
        run(cfg)


def test_bad_images_become_error_rows(ray_cluster, imagenet, tmp_path):
    root = tmp_path / "bad"
    import shutil

    shutil.copytree(imagenet / "folder", root)
    (root / WNIDS[0] / "ILSVRC2012_val_00000010.JPEG").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    (root / WNIDS[1] / "ILSVRC2012_val_00000011.JPEG").write_bytes(jpeg(np.random.default_rng(1), (50, 50), "L"))
    (root / WNIDS[1] / "bomb.png").write_bytes(png_header(15000, 15000))  # above PIL's decompression-bomb limit
    (root / WNIDS[2] / "text.JPEG").write_bytes(b"not an image")
    (root / WNIDS[2]).joinpath(os.fsdecode(b"bad\xff\xfename.JPEG")).write_bytes(b"never listed")
    summary = run(config(tmp_path, {"layout": "imagenet_folder", "root": str(root), "mode": None}))
    uri, table = summary.uri, rows(summary.uri)
    assert len(table) == 2 * 13  # the file whose name is not UTF-8 is skipped with a warning
    nodes = set(read_results(open_location(uri).join("results"))["node"].to_pylist())
    assert len(nodes) == 1 and re.fullmatch(r".+/[0-9a-f]{12}", nodes.pop())  # host name and Ray node id
    errors = {row["image_id"]: row["error"] for row in table if row["status"] == "error"}
    assert set(errors) == {"ILSVRC2012_val_00000010.JPEG", "ILSVRC2012_val_00000011.JPEG", "bomb.png", "text.JPEG"}
    assert "cannot decode image" in errors["ILSVRC2012_val_00000010.JPEG"]
    assert "1 channel(s)" in errors["ILSVRC2012_val_00000011.JPEG"]
    assert "too large to decode safely" in errors["bomb.png"]
    assert "cannot identify an image" in errors["text.JPEG"] and "0x" not in errors["text.JPEG"]
    assert sum(row["status"] == "ok" for row in table) == 18
    assert summary.status == "finished" and summary.results.num_rows == len(table)  # what the run wrote, as read
    assert summary.counts == open_location(uri).read_json("manifest.json")["counts"]
    assert summary.counts["error_rows"] == 2 * 4 and summary.counts["failed"] == 4
    assert "Certified accuracy" in summary.brief


def test_invalid_config_fails_before_work(tmp_path):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="unknown certifier 'smoothing'"):
        config(tmp_path, {"layout": "demo"}, certifiers=[{"name": "smoothing", "sigma": 0.25}])
    with pytest.raises(ConfigError, match=r"dataset\.root"):
        config(tmp_path, {"layout": "imagenet_folder"})
    assert not any(tmp_path.iterdir())


def test_reusing_a_run_id_with_other_settings_is_refused(tmp_path):
    from pipeline import run as lifecycle

    lifecycle.fail(lifecycle.prepare(config(tmp_path, {"layout": "demo", "max": 2})), RuntimeError("stopped"))
    changed = config(tmp_path, {"layout": "demo", "max": 2}, seed=1)
    with pytest.raises(ValueError, match="already exists with different seed"):
        run(changed)


@pytest.mark.faults
def test_killed_run_resumes_with_every_image_exactly_once(ray_cluster, tmp_path):
    cfg = config(tmp_path, {"layout": "demo", "max": 24}, images_per_batch=2,
                 certifiers=[{"name": "cohen", "sigma": 0.25, "n0": 100, "n": 2000}])
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    results = tmp_path / "run" / "results"
    job = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "certify.py"), "--config", str(path)],
                           env={**os.environ, "RAY_ADDRESS": ray_cluster}, cwd=ROOT, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(results.glob("part-*.parquet"))) < 3:
        assert job.poll() is None, "the job ended before it could be interrupted"
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    written = len(list(results.glob("part-*.parquet")))
    assert 3 <= written < 12, "the job was not stopped mid-way"

    run(cfg)
    table = read_results(open_location(str(tmp_path / "run")).join("results"))
    ids = table["image_id"].to_pylist()
    assert len(ids) == 24 and len(set(ids)) == 24
    manifest = open_location(str(tmp_path / "run")).read_json("manifest.json")
    assert manifest["attempts"] == 2 and manifest["counts"]["already_done"] >= 2 * written - 2


def test_report_reproduces_the_papers_table2_row(reference):
    from pipeline import report
    from pipeline.results import read_certify_log

    table = read_certify_log(reference / "cohen" / "imagenet_resnet50_sigma0.50.tsv", sigma=0.5)
    accuracy = report.certified_accuracy(table, [0.0, 0.5, 1.0, 1.5]).iloc[0]
    assert [round(value, 2) for value in accuracy] == [0.57, 0.46, 0.37, 0.29]


@pytest.mark.faults
def test_a_second_run_of_a_run_id_in_progress_is_refused(ray_cluster, tmp_path):
    """While one job certifies a run id (its lease renewed), a second start of the same id refuses, naming
    the holder; after the first ends, the id is free again and the manifest says `finished`."""
    from pipeline import run as lifecycle
    from pipeline.lease import RunBusy

    cfg = config(tmp_path, {"layout": "demo", "max": 8}, run_id="busy", images_per_batch=2,
                 certifiers=[{"name": "cohen", "sigma": 0.25, "n0": 100, "n": 500}])
    path = tmp_path / "busy.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    job = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "certify.py"), "--config", str(path)],
                           env={**os.environ, "RAY_ADDRESS": ray_cluster}, cwd=ROOT, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lease = tmp_path / "busy" / "lease.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not lease.exists():
        assert job.poll() is None, "the first job ended before it took its lease"
        time.sleep(0.2)
    with pytest.raises(RunBusy, match=rf"run busy is in progress: process {job.pid} on .* holds"):
        lifecycle.prepare(cfg)
    assert job.wait(timeout=300) == 0
    assert not lease.exists()
    manifest = json.loads((tmp_path / "busy" / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["attempts"] == 1
