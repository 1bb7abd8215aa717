"""Certification over Ray Data: the batches of `pipeline.run`, moved through an actor pool.

    pending listing (driver) -> decode (Ray Data) -> CertifyActor pool (GPU, or CPU) -> Parquet files

`run` hands `certify_pending` to `pipeline.run.execute`, which prepares the run and calls it to stream
the pending images through an actor pool. Each actor loads the model once, certifies a batch
(`pipeline.run.certify_batch`) and writes its rows as one Parquet file under `<run>/results/`, named by
the batch's image ids. A file appears whole or not at all, and every file holds all settings of its
images, so a killed run, restarted, certifies each missing image once and never duplicates a row. The
run's bookkeeping and failure policy are `pipeline.run.execute`'s; this module only moves the batches,
and gives back the StorageOutage or WriteFailed that Ray Data reports as a task error
(`_typed_storage_error`).
"""

from __future__ import annotations

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
from pipeline.models import load_model
from pipeline.progress import Progress
from pipeline.storage import Location, StorageOutage, WriteFailed

log = logging.getLogger(__name__)

__all__ = ["CertifyActor", "certify_pending", "pool_resources", "run"]


class CertifyActor:
    """Loads the classifier once; certifies batches of decoded images and writes their rows."""

    def __init__(self, config: RunConfig, certifiers: list[Certifier], results: Location, run_info: dict,
                 device: str, batch_sizes: dict[str, int]):
        torch.set_num_threads(max(1, math.floor(config.actors.cpus)))
        model = load_model(config.model, config.storage, config.dataset.transform.shape)
        self.engine = lifecycle.engine_for(config, model, device, batch_sizes)
        self.certifiers, self.results, self.seed = certifiers, results, config.seed
        node_id = ray.get_runtime_context().get_node_id()[:12]  # two Ray nodes on one host share its name
        self.run_info = {**run_info, "node": f"{socket.gethostname()}/{node_id}"}
        log.info("certifier actor on %s (%s) ready", self.run_info["node"], device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(i) for i in batch["image_id"]]
        if ids:
            table = lifecycle.certify_batch(self.engine, self.certifiers, batch, self.seed, self.run_info)
            self.results.write_parquet(lifecycle.batch_file(ids), table)
        failed = lifecycle.error_images(table) if ids else set()
        return {"image_id": np.array(ids, dtype=object), "failed": np.array([i in failed for i in ids], dtype=bool)}


def _device_and_gpus(config: RunConfig) -> tuple[str, float]:
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    gpus = float(config.actors.gpus)
    if config.device == "cuda" and not cluster_gpus:
        raise RuntimeError("device: cuda was asked for, but the Ray cluster has no GPUs")
    if config.device == "cpu" or not cluster_gpus:
        return "cpu", 0.0
    return "cuda", gpus or 1.0


def pool_resources(config: RunConfig, gpus: float) -> dict[str, float]:
    """What each actor of the pool asks Ray for: its GPUs alone when it has some (as Ray documents GPU actor
    pools; Ray adds the one CPU it reserves for GPU work, and warns when both are given), else its CPUs."""
    return {"num_gpus": gpus} if gpus else {"num_cpus": config.actors.cpus}


def _actor_count(config: RunConfig, gpus: float) -> int:
    """The actors of the pool: as configured, or with `count: auto` one per `gpus` of the cluster's GPUs (one
    when certifying on CPUs)."""
    if config.actors.count != "auto":
        return config.actors.count
    return max(1, math.floor(ray.cluster_resources().get("GPU", 0) / gpus)) if gpus else 1


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


def certify_pending(run: lifecycle.Run, sigterm=None) -> dict[str, int]:
    """Certifies the run's pending images over Ray, showing one progress display (`pipeline.progress`);
    returns the counts of this attempt: certified, failed (images that became error rows, for any reason).
    `sigterm`: the handler of `pipeline.run.stop_on_sigterm`, put back after Ray starts (Ray's replaces it)."""
    counts, todo, config = {"certified": 0, "failed": 0}, run.pending.num_rows, run.config
    with Progress(todo, "images", "certified", logger=log) as progress:  # from before Ray starts: it takes a while
        init_ray()
        if sigterm is not None:
            sigterm.install()
        device, gpus = _device_and_gpus(config)
        count = counts["actors"] = _actor_count(config, gpus)
        resources = pool_resources(config, gpus)
        kwargs = {"config": config, "certifiers": run.certifiers, "results": run.results, "run_info": run.info,
                  "device": device, "batch_sizes": run.batch_sizes}
        certified = _decoded(run).map_batches(
            CertifyActor, batch_size=config.images_per_batch, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=count), **resources, fn_constructor_kwargs=kwargs)
        log.info("certifying %d images with %d settings on %d %s actor(s)", todo, len(run.certifiers), count,
                 device)
        try:
            for batch in certified.iter_batches(batch_size=None, batch_format="numpy"):
                failed = int(batch["failed"].sum())
                counts["certified"] += len(batch["image_id"])
                counts["failed"] += failed
                progress.update(len(batch["image_id"]), failed)
        except ray.exceptions.RayTaskError as error:
            stopped = _typed_storage_error(error)
            if stopped is None:
                raise
            raise stopped from error
    return counts


def _typed_storage_error(error: ray.exceptions.RayTaskError) -> StorageOutage | WriteFailed | None:
    """The StorageOutage or WriteFailed a Ray task raised, or None when it raised another error. A task
    error carries what the task raised as its `cause` (`lifecycle.outage_behind` walks it), but Ray Data
    wraps what a map function raises in a `UserCodeException` whose `__cause__`, the original, does not
    survive the trip to the driver (Ray 2.60 pickles exceptions without their chain). Then, as the last
    resort, the error is read from the task's traceback text, which Ray keeps."""
    typed = lifecycle.outage_behind(error) or lifecycle.write_failure_behind(error)
    if typed is not None:
        return typed
    text = lifecycle.ANSI.sub("", str(error))
    found = re.search(r"(StorageOutage|WriteFailed): (.+)", text)
    if found is None:
        return None
    return (StorageOutage if found.group(1) == "StorageOutage" else WriteFailed)(found.group(2).strip())


def run(config: RunConfig) -> lifecycle.RunSummary:
    """The whole certification run (`pipeline.run.execute`) with its pending images certified over Ray;
    returns the run's summary. SIGTERM (`ray job stop`) stops it as Ctrl-C does (`pipeline.run.Interrupted`)."""
    with lifecycle.stop_on_sigterm() as sigterm:
        return lifecycle.execute(config, lambda run: certify_pending(run, sigterm))
