"""Certification over Ray Data: the batches of `pipeline.run`, moved through an actor pool.

    pending listing (driver) -> decode (Ray Data) -> CertifyActor pool (GPU, or CPU) -> Parquet files

The driver prepares the run (`pipeline.run.prepare`) and streams the pending images through an actor
pool. Each actor loads the model once, certifies a batch (`pipeline.run.certify_batch`) and writes its
rows as one Parquet file under `<run>/results/`, named by the batch's image ids. A file appears whole or
not at all, and every file holds all settings of its images, so a killed run, restarted, certifies each
missing image once and never duplicates a row. The driver then finishes the run (`pipeline.run.finish`).
"""

from __future__ import annotations

import json
import logging
import math
import re
import socket

import numpy as np
import ray
import torch

from pipeline import run as lifecycle
from pipeline.certifiers import Certifier
from pipeline.config import RunConfig
from pipeline.data.preprocess import decode_batch
from pipeline.data.sources import parquet_files
from pipeline.distributed import init_ray
from pipeline.engine import Engine
from pipeline.models import load_model
from pipeline.progress import Progress
from pipeline.storage import Location, StorageOutage

log = logging.getLogger(__name__)

__all__ = ["CertifyActor", "certify_pending", "run"]


class CertifyActor:
    """Loads the classifier once; certifies batches of decoded images and writes their rows."""

    def __init__(self, config: RunConfig, certifiers: list[Certifier], results: Location, run_info: dict,
                 device: str):
        torch.set_num_threads(max(1, math.floor(config.actors.cpus)))
        self.engine = Engine(load_model(config.model, config.storage), device=device, batch_size=config.batch_size,
                             precision=config.precision, channels_last=config.channels_last, compile=config.compile)
        self.certifiers, self.results, self.seed = certifiers, results, config.seed
        node_id = ray.get_runtime_context().get_node_id()[:12]  # two Ray nodes on one host share its name
        self.run_info = {**run_info, "node": f"{socket.gethostname()}/{node_id}"}
        log.info("certifier actor on %s (%s) ready", self.run_info["node"], device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(i) for i in batch["image_id"]]
        if ids:
            table = lifecycle.certify_batch(self.engine, self.certifiers, batch, self.seed, self.run_info)
            self.results.write_parquet(lifecycle.batch_file(ids), table)
        batch_size = json.dumps({"node": self.run_info["node"], **self.engine.settings()["batch"]}, sort_keys=True)
        return {"image_id": np.array(ids, dtype=object), "failed": np.array([bool(e) for e in batch["error"]]),
                "batch_size": np.array([batch_size] * len(ids), dtype=object)}


def _device_and_gpus(config: RunConfig) -> tuple[str, float]:
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    gpus = float(config.actors.gpus)
    if config.device == "cuda" and not cluster_gpus:
        raise RuntimeError("device: cuda was asked for, but the Ray cluster has no GPUs")
    if config.device == "cpu" or not cluster_gpus:
        return "cpu", 0.0
    return "cuda", gpus or 1.0


def _decoded(run: lifecycle.Run) -> ray.data.Dataset:
    """The pending images, read and decoded by Ray Data in batches of `images_per_batch`."""
    config, todo = run.config, run.pending
    if config.dataset.layout == "parquet":
        root, files = parquet_files(config.dataset, config.storage)
        source = ray.data.read_parquet(files, filesystem=root.fs, columns=None)
        where = {"keep": dict(zip(todo["image_id"].to_pylist(), todo["index"].to_pylist(), strict=True))}
    else:
        blocks = max(1, min(math.ceil(todo.num_rows / config.images_per_batch), 1000))
        source = ray.data.from_arrow(todo).repartition(blocks)
        where = {"fs": config.storage.open(config.dataset.root).fs if config.dataset.root else None,
                 "retry_seconds": config.storage.retry_seconds}
    return source.map_batches(decode_batch, fn_kwargs={"transform": config.dataset.transform, **where},
                              batch_size=config.images_per_batch, batch_format="numpy")


def certify_pending(run: lifecycle.Run) -> dict[str, int]:
    """Certifies the run's pending images over Ray, showing one progress display (`pipeline.progress`);
    returns counts: listed, already done, certified now, failed now."""
    todo = run.pending.num_rows
    counts = {"listed": run.listing.num_rows, "already_done": run.listing.num_rows - todo, "certified": 0,
              "failed": 0}
    if todo == 0:
        return counts
    config = run.config
    with Progress(todo, "images", "certified", logger=log) as progress:  # from before Ray starts: it takes a while
        init_ray()
        device, gpus = _device_and_gpus(config)
        certified = _decoded(run).map_batches(
            CertifyActor, batch_size=config.images_per_batch, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=config.actors.count), num_cpus=config.actors.cpus,
            num_gpus=gpus, fn_constructor_kwargs={"config": config, "certifiers": run.certifiers,
                                                  "results": run.results, "run_info": run.info, "device": device})
        log.info("certifying %d images with %d settings on %d %s actor(s)", todo, len(run.certifiers),
                 config.actors.count, device)
        batch_sizes = set()
        for batch in certified.iter_batches(batch_size=None, batch_format="numpy"):
            batch_sizes.update(batch["batch_size"])
            failed = int(batch["failed"].sum())
            counts["certified"] += len(batch["image_id"])
            counts["failed"] += failed
            progress.update(len(batch["image_id"]), failed)
    run.manifest["batch"] = [json.loads(record) for record in sorted(batch_sizes)]  # per actor: size, how chosen
    return counts


def run(config: RunConfig) -> str:
    """The whole certification run over Ray (`pipeline.run`: prepare, certify the pending images, finish);
    returns the run's URI."""
    prepared = lifecycle.prepare(config)
    with prepared.lease.kept():  # renewed while the run works; a second run of the id refuses meanwhile
        try:
            lifecycle.finish(prepared, certify_pending(prepared))
        except lifecycle.IncompleteRun:  # finish marked the manifest "incomplete" itself
            raise
        except Exception as error:  # an outage while certifying or finishing marks the manifest "failed"
            outage = _outage(error)
            lifecycle.fail(prepared, outage or error)
            if outage is not None:  # one line, not the traceback of the Ray task it happened in
                raise StorageOutage(f"run {config.run_id} stopped: {outage}; rerun the same command to go on "
                                    f"where it stopped") from None
            raise
    return prepared.location.uri


def _outage(error: BaseException) -> StorageOutage | None:
    """The StorageOutage behind an error, also one raised in a Ray task (whose exception reaches the driver
    as a wrapper carrying the task's traceback text), if one is."""
    if isinstance(error, StorageOutage) and not hasattr(error, "cause"):
        return error
    found = re.search(r"StorageOutage: (.+)", str(error))
    return StorageOutage(found.group(1).strip()) if found else None
