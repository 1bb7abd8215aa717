"""One certification run, below Ray: prepare -> certify a batch (as many times as there are batches) -> finish.

- `prepare(config)` fails before any certification work when the output cannot be written, the model
  cannot be loaded, the dataset cannot be listed or the run id already holds a run with another
  configuration; it writes the manifest and finds the images still pending (those without a row for
  every setting), so a rerun of a run id certifies only what earlier attempts did not write.
- `certify_batch` turns one decoded batch into its rows: certificates for the images that decoded, an
  error row per setting for each that did not. `batch_file` names the batch's Parquet file by its image
  ids, so a retried batch overwrites its own file and never duplicates a row.
- `finish` checks that no (image, setting) has two rows, completes the manifest (with each actor's batch
  size, read from the rows' params) and writes the report; it returns the run's `RunSummary`.
- `execute(config, certify_pending)` is the whole run and its failure policy: a run that stops with an error
  marks its manifest `failed` (with the reason) and releases its lease; a storage outage anywhere in the
  error's chain becomes one `StorageOutage` line that says to rerun; an `IncompleteRun` (manifest
  `incomplete`) passes through as it is.

Whoever runs the batches (`certify_pending`: `pipeline.distributed.certify` over Ray Data) only moves them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.certification import certify_rows
from pipeline.certifiers import Certificate, Certifier
from pipeline.config import RunConfig
from pipeline.data.preprocess import NO_LABEL
from pipeline.data.sources import list_images
from pipeline.engine import Engine
from pipeline.lease import Lease, acquire
from pipeline.models import load_model
from pipeline.results import RowContext, environment, manifest_matches, read_results, result_row, to_table
from pipeline.storage import Location, StorageOutage, check_writable

log = logging.getLogger(__name__)

__all__ = ["IncompleteRun", "Run", "RunSummary", "batch_file", "certify_batch", "check_model", "done_image_ids",
           "execute", "fail", "finish", "outage_behind", "prepare"]


@dataclass
class Run:
    """A prepared run: its settings, where it writes, what it lists and what is still pending."""

    config: RunConfig
    certifiers: tuple[Certifier, ...]
    location: Location
    listing: pa.Table
    pending: pa.Table
    manifest: dict
    lease: Lease

    @property
    def results(self) -> Location:
        return self.location.join("results")

    @property
    def info(self) -> dict:
        """The run columns of its rows (the node is added where a batch is certified)."""
        return {"run_id": self.config.run_id, "model": self.config.model.name or self.config.model.weights,
                "code_version": self.manifest["code_version"]}


@dataclass(frozen=True)
class RunSummary:
    """What a finished run wrote, as `finish` saw it: where (`location`, `uri`), its status, the manifest's
    counts (listed, already_done, certified, failed this attempt; rows, images, error_rows in all), the
    report's Markdown summary, the terminal's brief and the result rows themselves."""

    run_id: str
    location: Location
    status: str
    counts: dict
    summary: str
    brief: str
    results: pa.Table

    @property
    def uri(self) -> str:
        return self.location.uri


def prepare(config: RunConfig) -> Run:
    """Checks, manifest and the pending images of a run (see the module docstring)."""
    location = config.storage.open(config.output).join(config.run_id)
    check_writable(location)
    certifiers = config.certifiers
    num_classes = check_model(load_model(config.model, config.storage), config.dataset.transform.shape, certifiers)
    listing = list_images(config.dataset, config.storage)
    _warn_of_labels(listing, num_classes)
    lease = acquire(location, config.run_id)
    try:
        manifest = _start_manifest(location, config)
    except Exception:
        lease.release()
        raise
    done = done_image_ids(read_results(location.join("results"), ["image_id", "setting"]),
                          [certifier.setting for certifier in certifiers])
    pending = listing.filter(pc.invert(pc.is_in(listing["image_id"], pa.array(sorted(done), pa.string()))))
    log.info("%d images listed, %d already certified by earlier attempts, %d to certify", listing.num_rows,
             listing.num_rows - pending.num_rows, pending.num_rows)
    return Run(config, certifiers, location, listing, pending, manifest, lease)


def check_model(model: torch.nn.Module, shape: tuple[int, int, int], certifiers: Sequence[Certifier]) -> int:
    """One clean forward on a blank input of the dataset's shape, before any work: the model must run on it
    and return finite scores [1, num_classes >= 2] that every certifier can use. Returns num_classes."""
    engine = Engine(model)
    image = torch.zeros(shape)
    try:
        num_classes = certifiers[0].num_classes(engine, image)
        scores = engine.logits(image[None])
    except RuntimeError as error:
        raise ValueError(f"the model cannot run on the dataset's {shape[0]}x{shape[1]}x{shape[2]} inputs: "
                         f"{error}") from error
    if not torch.isfinite(scores).all():
        raise ValueError("the model returns NaN or infinite scores on a clean input; check its weights and its "
                         "normalisation (model.mean, model.std)")
    for certifier in certifiers:
        certifier.check_num_classes(num_classes)
    return num_classes


def _warn_of_labels(listing: pa.Table, num_classes: int) -> None:
    outside = pc.sum(pc.greater_equal(listing["label"], num_classes)).as_py() or 0  # negative: unlabelled
    if outside:
        log.warning("%d images have labels outside the model's classes 0..%d; they will be error rows", outside,
                    num_classes - 1)


def _start_manifest(location: Location, config: RunConfig) -> dict:
    manifest = {"run_id": config.run_id, "config": config.to_dict(), **environment()}
    if location.join("manifest.json").exists():
        earlier = location.read_json("manifest.json")
        manifest_matches(earlier, manifest)
        manifest.update(started=earlier["started"], attempts=earlier.get("attempts", 1) + 1)
    else:
        manifest.update(started=_now(), attempts=1)
    manifest["status"] = "running"
    location.write_json("manifest.json", manifest)
    return manifest


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def done_image_ids(results: pa.Table, settings: list[str]) -> set[str]:
    """Images that already have a row for every setting."""
    if results.num_rows == 0:
        return set()
    grouped = results.group_by("image_id").aggregate([("setting", "count_distinct")])
    complete = pc.equal(grouped["setting_count_distinct"], len(settings))
    return set(grouped.filter(complete)["image_id"].to_pylist())


def certify_batch(engine: Engine, certifiers: Sequence[Certifier], batch: dict[str, np.ndarray], seed: int,
                  run_info: dict) -> pa.Table:
    """The rows of one decoded batch (`pipeline.data.preprocess.decode_batch`), sorted by image and setting;
    `image_index` is the dataset index."""
    ids = [str(i) for i in batch["image_id"]]
    labels = [None if label == NO_LABEL else int(label) for label in batch["label"]]
    errors = _label_errors(engine, certifiers, batch, ids, labels)
    good = [i for i, error in enumerate(errors) if not error]
    rows = []
    if good:
        pixels = torch.from_numpy(batch["pixels"][good]).float().div_(255)
        rows = certify_rows(engine, pixels, [labels[i] for i in good], certifiers, seed=seed,
                            image_ids=[ids[i] for i in good], run_info=run_info,
                            indices=[int(batch["index"][i]) for i in good])
    context = RowContext(seed=seed, precision=engine.precision, device=engine.device.type, run=run_info)
    rows += [result_row(certifier, Certificate.failed(error), int(batch["index"][i]), ids[i], labels[i], 0.0, context)
             for i, error in enumerate(errors) if error for certifier in certifiers]
    return to_table(rows).sort_by([("image_id", "ascending"), ("setting", "ascending")])


def _label_errors(engine: Engine, certifiers: Sequence[Certifier], batch: dict[str, np.ndarray], ids: list[str],
                  labels: list[int | None]) -> list[str]:
    """The batch's decoding errors, plus one for each decoded image whose label the model cannot have."""
    errors = [str(error) for error in batch["error"]]
    decoded = [i for i, error in enumerate(errors) if not error]
    if not decoded:
        return errors
    num_classes = certifiers[0].num_classes(engine, torch.from_numpy(batch["pixels"][decoded[0]]).float() / 255)
    for i in decoded:
        if labels[i] is not None and not 0 <= labels[i] < num_classes:
            errors[i] = f"{ids[i]}: label {labels[i]} is outside the model's classes 0..{num_classes - 1}"
    return errors


def batch_file(image_ids: Sequence[str]) -> str:
    """The name of a batch's results file: a hash of its image ids, whatever their order."""
    digest = hashlib.sha1("\n".join(sorted(image_ids)).encode()).hexdigest()[:20]
    return f"part-{digest}.parquet"


def execute(config: RunConfig, certify_pending: Callable[[Run], dict[str, int]]) -> RunSummary:
    """The whole run: `prepare`, `certify_pending(run)` when images are pending (it writes their rows and
    returns the counts `certified` and `failed` of this attempt), `finish`. Its failure policy is in the
    module docstring: the manifest says `failed` or `incomplete`, the lease is released, and an outage is
    raised as one line."""
    run = prepare(config)
    with run.lease.kept():  # renewed while the run works; a second run of the id refuses meanwhile
        try:
            counts = {"listed": run.listing.num_rows, "already_done": run.listing.num_rows - run.pending.num_rows,
                      "certified": 0, "failed": 0}
            if run.pending.num_rows:
                counts.update(certify_pending(run))
            return finish(run, counts)
        except IncompleteRun:  # finish marked the manifest "incomplete" itself
            raise
        except Exception as error:  # an outage while certifying or finishing marks the manifest "failed"
            outage = outage_behind(error)
            fail(run, outage or error)
            if outage is not None:  # one line, not the traceback of the task it happened in
                raise StorageOutage(f"run {config.run_id} stopped: {outage}; rerun the same command to go on "
                                    f"where it stopped") from None
            raise


def outage_behind(error: BaseException) -> StorageOutage | None:
    """The StorageOutage in `error`'s chain (itself, its `__cause__` and `__context__`, and the `cause` a
    task error of a distributed runner carries), if there is one. An exception that is a StorageOutage only
    as a wrapper of one (it has a `cause`) stands for its cause, whose message is the outage's own."""
    for link in _chain(error):
        if isinstance(link, StorageOutage) and not isinstance(getattr(link, "cause", None), BaseException):
            return link
    return None


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen, todo = set(), [error]
    while todo:
        link = todo.pop(0)
        if link is None or id(link) in seen:
            continue
        seen.add(id(link))
        yield link
        cause = getattr(link, "cause", None)
        todo += [cause if isinstance(cause, BaseException) else None, link.__cause__, link.__context__]


def fail(run: Run, error: BaseException) -> None:
    """Marks the manifest `failed` with the reason (retried as long as any write, should the storage be what
    failed) and releases the lease."""
    run.manifest.update(status="failed", failed=_now(), reason=f"{type(error).__name__}: {error}"[:1000])
    try:
        run.location.write_json("manifest.json", run.manifest)
    except OSError as unwritable:
        log.warning("could not mark %s/manifest.json failed: %s", run.location.uri, unwritable)
    run.lease.release()


class IncompleteRun(RuntimeError):
    """A run that ended without a row for every listed image and setting; a rerun certifies the missing ones."""


def finish(run: Run, counts: dict[str, int]) -> RunSummary:
    """The exactly-once and completeness checks, the finished manifest and the report; returns the run's
    summary. IncompleteRun (manifest status "incomplete") when listed images lack rows, as when a results
    file was lost during the run."""
    results = read_results(run.results)
    keys = pa.table({"image_id": results["image_id"], "setting": results["setting"]})
    unique = keys.group_by(["image_id", "setting"]).aggregate([]).num_rows
    if unique != results.num_rows:
        raise RuntimeError(f"{run.location.uri}: {results.num_rows - unique} duplicated result rows")
    if run.pending.num_rows:
        run.manifest["batch"] = batch_sizes(results, run.pending["image_id"])
    done = done_image_ids(results.select(["image_id", "setting"]), [c.setting for c in run.certifiers])
    missing = sorted(set(run.listing["image_id"].to_pylist()) - done)
    if missing:
        run.manifest.update(status="incomplete", counts={**counts, "missing": len(missing)})
        run.location.write_json("manifest.json", run.manifest)
        run.lease.release()
        raise IncompleteRun(f"run {run.config.run_id}: {len(missing)} of {run.listing.num_rows} listed images have "
                            f"no rows for every setting (e.g. {', '.join(missing[:5])}); results may have been "
                            f"lost from {run.results.uri}. Rerun the same command to certify them.")
    run.manifest.update(status="finished", finished=_now(), counts={
        **counts, "rows": results.num_rows, "images": len(set(results["image_id"].to_pylist())),
        "error_rows": int(pc.sum(pc.equal(results["status"], "error")).as_py() or 0)})
    run.location.write_json("manifest.json", run.manifest)
    from pipeline import report  # matplotlib: imported where the report is written, not by every actor

    summary = report.write_report(results, run.location.join("report"), run.config.report_radii, run.manifest)
    run.lease.release()
    log.info("run %s finished: %d images, %d rows; results in %s", run.config.run_id,
             run.manifest["counts"]["images"], results.num_rows, run.results.uri)
    return RunSummary(run.config.run_id, run.location, "finished", dict(run.manifest["counts"]), summary,
                      report.brief(results, run.config.report_radii, label=run.config.run_id), results)


def batch_sizes(results: pa.Table, image_ids: pa.ChunkedArray | pa.Array) -> list[dict]:
    """How each worker that certified `image_ids` ran its forward passes, from those images' rows: its node
    and the batch size in the rows' params (with how it was chosen, and the probe's figures when it was),
    once per distinct record, sorted."""
    rows = results.filter(pc.and_(pc.is_in(results["image_id"], image_ids), pc.equal(results["status"], "ok")))
    records = set()
    for node, params in zip(rows["node"].to_pylist(), rows["params"].to_pylist(), strict=True):
        batch = json.loads(params).get("batch")
        if batch is not None:
            records.add(json.dumps({"node": node, **batch}, sort_keys=True))
    return [json.loads(record) for record in sorted(records)]
