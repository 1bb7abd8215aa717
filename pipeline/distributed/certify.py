"""Certification over Ray Data.

    listing (driver) -> decode + preprocess (CPU tasks) -> CertifyActor pool (GPU, or CPU) -> Parquet files

The driver lists the dataset, drops images that earlier attempts of the run already wrote, and streams
the rest through an actor pool. Each actor loads the model once, runs the engine for every certifier
on a batch of images, and writes that batch's rows as one Parquet file under `<run>/results/`, named
by a hash of the batch's image ids. A file appears whole or not at all, and every file holds all
settings of its images, so a killed run, restarted, certifies each missing image once and never
duplicates a row.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from pipeline.certification import certify_rows
from pipeline.config import RunConfig, validate
from pipeline.data.preprocess import ImageError, Transform, decode
from pipeline.data.sources import list_images, parquet_files
from pipeline.engine import Engine
from pipeline.models import load_model
from pipeline.results import error_row, read_results, to_table
from pipeline.storage import check_writable, open_location

log = logging.getLogger(__name__)

__all__ = ["CertifyActor", "certify_dataset", "init_ray", "preprocess", "run"]


def init_ray() -> None:
    """Joins the cluster named by RAY_ADDRESS (as under `ray job submit`), or starts a local instance with at
    least 4 logical CPUs, so that read and write tasks keep running beside the actors."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(num_cpus=max(4, os.cpu_count() or 1))


def preprocess(batch: dict[str, np.ndarray], transform: Transform, storage: dict, root: str | None,
               keep: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Decodes a batch of rows (encoded bytes, or paths read from `root`'s filesystem) into uint8 pixels.

    An image that cannot be read or decoded keeps its row, with zeros for pixels and the reason in `error`.
    With `keep` (image_id -> dataset index, for Parquet shards), rows whose image_id is not in it are dropped.
    """
    ids = [str(i) for i in batch["image_id"]]
    rows = [i for i, image_id in enumerate(ids) if keep is None or image_id in keep]
    indices = [keep[ids[row]] if keep is not None else int(batch["index"][row]) for row in rows]
    fs = open_location(root, **storage).fs if root and "path" in batch else None
    pixels = np.zeros((len(rows), *transform.shape), dtype=np.uint8)
    errors = []
    for out, row in enumerate(rows):
        data = batch["image"][row] if "image" in batch else None
        try:
            if data is None and fs is None:
                raise ImageError("the row holds no image bytes")
            if data is None:
                with fs.open_input_stream(str(batch["path"][row])) as stream:
                    data = stream.read()
            pixels[out] = decode(bytes(data), transform)
            errors.append("")
        except (ImageError, OSError) as error:
            errors.append(f"{ids[row]}: {error}")
    labels = [_label(batch["label"][row]) for row in rows]
    return {"index": np.array(indices, dtype=np.int64), "image_id": np.array([ids[row] for row in rows], dtype=object),
            "label": np.array([-1 if label is None else label for label in labels], dtype=np.int64),
            "pixels": pixels, "error": np.array(errors, dtype=object)}


def _label(value) -> int | None:
    """A dataset label as an int, or None where the dataset has none (null, NaN or negative)."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or int(value) < 0:
        return None
    return int(value)


class CertifyActor:
    """Loads the classifier once; certifies batches of preprocessed images and writes their rows."""

    def __init__(self, config: dict[str, Any], results_uri: str, run_info: dict[str, Any], device: str):
        self.config: RunConfig = validate(config)
        torch.set_num_threads(max(1, math.floor(self.config.actors["cpus"])))
        self.certifiers = self.config.build_certifiers()
        model = load_model(self.config.model, self.config.storage)
        self.engine = Engine(model, device=device, batch_size=self.config.batch_size,
                             precision=self.config.precision, channels_last=self.config.channels_last,
                             compile=self.config.compile)
        self.results = open_location(results_uri, **self.config.storage)
        self.run_info = {**run_info, "node": socket.gethostname()}
        log.info("certifier actor on %s (%s) ready", self.run_info["node"], device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(i) for i in batch["image_id"]]
        if not ids:
            return {"image_id": np.array([], dtype=object), "failed": np.array([], dtype=bool)}
        labels = [None if label < 0 else int(label) for label in batch["label"]]
        good = [i for i, error in enumerate(batch["error"]) if not error]
        rows = []
        if good:
            pixels = torch.from_numpy(batch["pixels"][good]).float().div_(255)
            rows = certify_rows(self.engine, pixels, [labels[i] for i in good], self.certifiers,
                                seed=self.config.seed, image_ids=[ids[i] for i in good], run_info=self.run_info)
            for row in rows:  # the dataset index, as the papers' `idx`
                row["image_index"] = int(batch["index"][good[row["image_index"]]])
        for i, error in enumerate(batch["error"]):
            if error:
                rows += [error_row(int(batch["index"][i]), ids[i], labels[i], certifier, error,
                                   seed=self.config.seed, wall_time_s=0.0,
                                   precision=self.config.precision, device=self.engine.device.type,
                                   **self.run_info) for certifier in self.certifiers]
        table = to_table(rows).sort_by([("image_id", "ascending"), ("setting", "ascending")])
        digest = hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:20]
        self.results.write_parquet(f"part-{digest}.parquet", table)
        return {"image_id": np.array(ids, dtype=object),
                "failed": np.array([bool(error) for error in batch["error"]])}


def done_image_ids(results: pa.Table, settings: list[str]) -> set[str]:
    """Images that already have a row for every setting."""
    if results.num_rows == 0:
        return set()
    grouped = results.group_by("image_id").aggregate([("setting", "count_distinct")])
    complete = pc.equal(grouped["setting_count_distinct"], len(settings))
    return set(grouped.filter(complete)["image_id"].to_pylist())


def _device_and_gpus(config: RunConfig) -> tuple[str, float]:
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    gpus = float(config.actors["gpus"])
    if config.device == "cuda" and not cluster_gpus:
        raise RuntimeError("device: cuda was asked for, but the Ray cluster has no GPUs")
    if config.device == "cpu" or not cluster_gpus:
        return "cpu", 0.0
    return "cuda", gpus or 1.0


def certify_dataset(config: RunConfig, listing: pa.Table, results_uri: str, run_info: dict[str, Any],
                    log_every: float = 5.0) -> dict[str, int]:
    """Certifies the images of `listing` (from `list_images`) that `results_uri` does not hold yet.

    Returns counts: listed, already done, certified now, failed now.
    """
    settings = [certifier.setting for certifier in config.build_certifiers()]
    done = done_image_ids(read_results(open_location(results_uri, **config.storage), ["image_id", "setting"]),
                          settings)
    todo = listing.filter(pc.invert(pc.is_in(listing["image_id"], pa.array(sorted(done), pa.string()))))
    counts = {"listed": listing.num_rows, "already_done": listing.num_rows - todo.num_rows, "certified": 0,
              "failed": 0}
    log.info("%d images listed, %d already certified by earlier attempts, %d to certify", listing.num_rows,
             counts["already_done"], todo.num_rows)
    if todo.num_rows == 0:
        return counts

    init_ray()
    device, gpus = _device_and_gpus(config)
    transform = config.transform()
    per_batch = config.images_per_batch
    if config.dataset["layout"] == "parquet":
        root, files = parquet_files(config.dataset, config.storage)
        source = ray.data.read_parquet(files, filesystem=root.fs, columns=None)
        keep = dict(zip(todo["image_id"].to_pylist(), todo["index"].to_pylist(), strict=True))
        prepare = {"transform": transform, "storage": config.storage, "root": None, "keep": keep}
    else:
        blocks = max(1, min(math.ceil(todo.num_rows / per_batch), 1000))
        source = ray.data.from_arrow(todo).repartition(blocks)
        prepare = {"transform": transform, "storage": config.storage, "root": config.dataset.get("root")}
    certified = (
        source.map_batches(preprocess, fn_kwargs=prepare, batch_size=per_batch, batch_format="numpy")
        .map_batches(CertifyActor, batch_size=per_batch, batch_format="numpy",
                     compute=ray.data.ActorPoolStrategy(size=config.actors["count"]),
                     num_cpus=config.actors["cpus"], num_gpus=gpus,
                     fn_constructor_kwargs={"config": config.to_dict(), "results_uri": results_uri,
                                            "run_info": run_info, "device": device})
    )
    started = last_log = time.monotonic()
    for batch in certified.iter_batches(batch_size=None, batch_format="numpy"):
        counts["certified"] += len(batch["image_id"])
        counts["failed"] += int(batch["failed"].sum())
        now = time.monotonic()
        if now - last_log >= log_every or counts["certified"] == todo.num_rows:
            rate = counts["certified"] / max(now - started, 1e-9)
            eta = (todo.num_rows - counts["certified"]) / rate if rate else float("inf")
            log.info("certified %d/%d images (%.0f%%), %.2f images/s, ETA %.0f s, %d failed", counts["certified"],
                     todo.num_rows, 100 * counts["certified"] / todo.num_rows, rate, eta, counts["failed"])
            last_log = now
    return counts


def run(config: RunConfig) -> str:
    """The whole certification run: checks, manifest, certification, exactly-once check, report.

    Fails before any certification work when the output cannot be written, the dataset cannot be listed,
    the model cannot be loaded, or the run id already holds a run with a different configuration.
    Returns the run's URI.
    """
    from pipeline import report
    from pipeline.results import environment, manifest_matches

    run_location = open_location(config.output, **config.storage).join(config.run_id)
    check_writable(run_location)
    load_model(config.model, config.storage)  # an unreadable checkpoint fails here, before any work
    listing = list_images(config.dataset, config.storage)
    manifest = {"run_id": config.run_id, "config": config.to_dict(), **environment()}
    if run_location.join("manifest.json").exists():
        earlier = run_location.read_json("manifest.json")
        manifest_matches(earlier, manifest)
        manifest["started"] = earlier["started"]
        manifest["attempts"] = earlier.get("attempts", 1) + 1
    else:
        manifest["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        manifest["attempts"] = 1
    manifest["status"] = "running"
    run_location.write_json("manifest.json", manifest)

    run_info = {"run_id": config.run_id, "model": config.model["name"], "code_version": manifest["code_version"]}
    counts = certify_dataset(config, listing, run_location.join("results").uri, run_info)
    results = read_results(run_location.join("results"))
    keys = pa.table({"image_id": results["image_id"], "setting": results["setting"]})
    unique = keys.group_by(["image_id", "setting"]).aggregate([]).num_rows
    if unique != results.num_rows:
        raise RuntimeError(f"{run_location.uri}: {results.num_rows - unique} duplicated result rows")
    manifest.update(status="finished", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), counts={
        **counts, "rows": results.num_rows, "images": len(set(results["image_id"].to_pylist())),
        "error_rows": int(pc.sum(pc.equal(results["status"], "error")).as_py() or 0)})
    run_location.write_json("manifest.json", manifest)
    report.write_report(results, run_location.join("report"), config.report_radii)
    log.info("run %s finished: %d images, %d rows; results in %s", config.run_id, manifest["counts"]["images"],
             results.num_rows, run_location.join("results").uri)
    return run_location.uri
