"""One certification run, below Ray: prepare -> certify a batch (as many times as there are batches) -> finish.

- `prepare(config)` fails before any certification work when the output cannot be written, the model
  cannot be loaded, the dataset cannot be listed, the run folder is held by a live run, its manifest is
  damaged or holds another configuration, or its `results/` holds a file this run did not write (not
  Parquet of the result schema, another run id or seed, or rows of a setting the config does not have:
  `pipeline.results.read_run_keys` names it). Those checks come before the manifest is rewritten
  `running`; a refusal releases the lease and removes the run folder if the attempt created it and left
  it empty. It then finds the images still pending: an image is done when it has an `ok` row for every
  configured setting, by setting identity. Rows of pending images (error rows, which a rerun retries, or
  the rows of an image some setting lacks) are removed from their files (each rewritten atomically, or
  deleted when nothing is left), so that the rerun writes each (image, setting) once; `.partial` files
  of writes that never completed are removed.
- `certify_batch` turns one decoded batch into its rows: certificates for the images that decoded, an
  error row per setting for each that did not. `batch_file` names the batch's Parquet file by its image
  ids, so a retried batch overwrites its own file and never duplicates a row.
- `finish` checks the exact pairs: every listed image has exactly one row for every configured setting
  and no row of another setting; it completes the manifest (with each actor's batch size, read from the
  rows' params) and writes the report; it returns the run's `RunSummary`.
- `execute(config, certify_pending)` is the whole run and its failure policy: a run that stops with an error
  marks its manifest `failed` (with a one-line reason, no colour codes or traceback) and releases its
  lease; a storage outage or a failed write (a full disk, a deleted bucket) anywhere in the error's chain
  becomes one line naming it (`StorageOutage`, `WriteFailed`) that says to rerun; Ctrl-C and SIGTERM
  (`stop_on_sigterm`) mark it `interrupted` and raise `Interrupted` (exit codes 130 and 143); an
  `IncompleteRun` (manifest `incomplete`) passes through as it is.

Whoever runs the batches (`certify_pending`: `pipeline.distributed.certify` over Ray Data) only moves them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import threading
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
from pipeline.engine import AUTO, Engine
from pipeline.lease import Lease, acquire
from pipeline.models import LoadedModel, open_model
from pipeline.results import (
    RowContext,
    environment,
    manifest_matches,
    read_results,
    read_run_keys,
    result_row,
    to_table,
)
from pipeline.storage import Location, StorageOutage, WriteFailed, check_writable

log = logging.getLogger(__name__)

__all__ = ["IncompleteRun", "Interrupted", "Run", "RunSummary", "batch_file", "certify_batch", "check_model",
           "check_pairs", "done_image_ids", "error_images", "execute", "fail", "finish", "outage_behind", "prepare",
           "reason_of", "stop_on_sigterm", "write_failure_behind"]


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
    def batch_sizes(self) -> dict[str, int]:
        """The rows per forward pass an earlier attempt's probe chose, by "device/precision" (the manifest's
        `batch_sizes`): a later attempt reuses them, so a resumed run certifies each image as an
        uninterrupted one would, also where GPU kernels make counts depend on the batch size."""
        return self.manifest.get("batch_sizes", {})

    @property
    def results(self) -> Location:
        return self.location.join("results")

    @property
    def info(self) -> dict:
        """The run columns of its rows (the node is added where a batch is certified)."""
        return {"run_id": self.config.run_id, "model": self.config.model.name or self.config.model.weights,
                "classifier": json.dumps(self.manifest.get("classifier"), sort_keys=True),
                "denoiser": self.manifest.get("denoiser"),
                "code_version": self.manifest["code_version"]}


@dataclass(frozen=True)
class RunSummary:
    """What a finished run wrote, as `finish` saw it: where (`location`, `uri`), its status, the manifest's
    counts (listed, already_done, certified, failed this attempt; rows, images, error_rows, error_images in
    all), the report's Markdown summary, the terminal's brief and the result rows themselves."""

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
    created = _missing_folders(location)
    try:
        check_writable(location)
        certifiers = config.certifiers
        loaded = open_model(config.model, config.storage, config.dataset.transform.shape)
        num_classes = check_model(loaded.model, config.dataset.transform.shape, certifiers)
        _tell_of_resize(loaded)
        listing = list_images(config.dataset, config.storage)
        _warn_of_labels(listing, num_classes)
        lease = acquire(location, config.run_id)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        return _open(config, location, listing, lease, loaded)
    except BaseException:
        lease.release()
        _remove_empty(created)
        raise


def _open(config: RunConfig, location: Location, listing: pa.Table, lease: Lease, loaded: LoadedModel) -> Run:
    """The checks that read the run folder, then (only when they pass) the manifest `running`, the
    removal of stale partial files and of the rows of pending images, and the Run."""
    earlier = _earlier_manifest(location)
    sigmas = sorted({float(certifier.sigma) for certifier in config.certifiers})
    denoiser = {repr(sigma): loaded.denoiser_record(sigma) for sigma in sigmas} if loaded.denoiser else None
    manifest = {"run_id": config.run_id, "config": config.to_dict(), "classifier": loaded.record(),
                "denoiser": denoiser, **environment()}
    if earlier is not None:
        manifest_matches(earlier, manifest)
    settings = [certifier.setting for certifier in config.certifiers]
    results = location.join("results")
    keys = read_run_keys(results, config.run_id, settings, config.seed)
    done = done_image_ids(keys, settings)
    _warn_of_unlisted(keys, listing, results)
    pending = listing.filter(pc.invert(pc.is_in(listing["image_id"], pa.array(sorted(done), pa.string()))))
    if earlier is not None:
        manifest.update(started=earlier.get("started", _now()), attempts=earlier.get("attempts", 1) + 1)
    else:
        manifest.update(started=_now(), attempts=1)
    manifest["status"] = "running"
    manifest["batch_sizes"] = _chosen_batch_sizes(earlier, results, keys)
    location.write_json("manifest.json", manifest)
    removed = location.remove_partials() + results.remove_partials()
    if removed:
        log.info("removed %d partial file(s) of writes an earlier attempt did not complete", removed)
    retried = _drop_rows(results, keys, set(pending["image_id"].to_pylist()))
    log.info("%d images listed, %d already certified by earlier attempts, %d to certify%s", listing.num_rows,
             listing.num_rows - pending.num_rows, pending.num_rows,
             f" ({retried} of them retried after error rows)" if retried else "")
    return Run(config, config.certifiers, location, listing, pending, manifest, lease)


def engine_for(config: RunConfig, model: torch.nn.Module, device: str, batch_sizes: dict[str, int]) -> Engine:
    """The engine a worker certifies with: the config's settings, and with `batch_size: auto` the size an
    earlier attempt of the run chose on this kind of device at this precision (`Run.batch_sizes`), if any."""
    size = batch_sizes.get(f"{torch.device(device).type}/{config.precision}") if config.batch_size == AUTO else None
    return Engine(model, device=device, batch_size=size or config.batch_size, precision=config.precision,
                  channels_last=config.channels_last, compile=config.compile,
                  chosen_by="earlier attempt" if size else None)


def _chosen_batch_sizes(earlier: dict | None, results: Location, keys: pa.Table) -> dict[str, int]:
    """The batch sizes earlier attempts chose, by "device/precision": from the earlier manifest, else (an
    attempt killed before it finished) from the params of the first results file with ok rows."""
    if earlier and earlier.get("batch_sizes"):
        return dict(earlier["batch_sizes"])
    ok = keys.filter(pc.equal(keys["status"], "ok"))
    if ok.num_rows == 0:
        return {}
    rows = results.read_parquet(ok["file"][0].as_py(), columns=["device", "status", "params"]).to_pylist()
    return _batch_sizes_of(rows)


def _batch_sizes_of(rows: list[dict]) -> dict[str, int]:
    """"device/precision" -> the batch size rows of ok status record, where a probe (or an earlier
    attempt's probe) chose it; a size a config fixed is not recorded, as the config gives it again."""
    chosen = {}
    for row in rows:
        params = json.loads(row["params"]) if row["status"] == "ok" else {}
        batch = params.get("batch") or {}
        if batch.get("chosen_by") in ("probe", "earlier attempt"):
            chosen.setdefault(f"{row['device']}/{params.get('precision')}", int(batch["size"]))
    return chosen


def _warn_of_unlisted(keys: pa.Table, listing: pa.Table, results: Location) -> None:
    unlisted = sorted(set(keys["image_id"].to_pylist()) - set(listing["image_id"].to_pylist()))
    if unlisted:
        log.warning("%s holds rows of %d image(s) the dataset no longer lists (e.g. %s); they stay in the results "
                    "and the report; if the dataset changed, use another run_id", results.uri, len(unlisted),
                    ", ".join(unlisted[:3]))


def _earlier_manifest(location: Location) -> dict | None:
    """The run folder's manifest.json, None when there is none; ValueError naming it when it is damaged."""
    if not location.join("manifest.json").exists():
        return None
    try:
        earlier = location.read_json("manifest.json")
    except (ValueError, UnicodeDecodeError) as error:
        earlier = error
    if not isinstance(earlier, dict) or not isinstance(earlier.get("config"), dict):
        problem = f" ({earlier})" if isinstance(earlier, Exception) else ""
        raise ValueError(f"{location.join('manifest.json').uri} is damaged: not a run manifest{problem}; restore "
                         f"it, or remove it (the result rows are then checked against this config), or use "
                         f"another run_id")
    return earlier


def _missing_folders(location: Location) -> list[str]:
    """The local folders from `location` up that do not exist yet (deepest first); none on object storage."""
    if location.is_s3:
        return []
    missing, path = [], location.path
    while path and not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path) if os.path.dirname(path) != path else ""
    return missing


def _remove_empty(folders: list[str]) -> None:
    """Removes the folders (deepest first) this attempt created, where it left them empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def _drop_rows(results: Location, keys: pa.Table, pending: set[str]) -> int:
    """Rewrites each result file holding rows of `pending` images without them (atomically; a file left
    empty is deleted), so a rerun writes those images' rows once. Returns how many pending images had
    rows (error rows, or rows of some settings only)."""
    if not keys.num_rows or not pending:
        return 0
    retried = pa.array(sorted(pending), pa.string())
    held = keys.filter(pc.is_in(keys["image_id"], retried))
    for name in sorted(set(held["file"].to_pylist())):
        table = results.read_parquet(name)
        kept = table.filter(pc.invert(pc.is_in(table["image_id"], retried)))
        if kept.num_rows:
            results.write_parquet(name, kept)
        else:
            results.fs.delete_file(results.join(name).path)
    return len(set(held["image_id"].to_pylist()))


def check_model(model: torch.nn.Module, shape: tuple[int, int, int], certifiers: Sequence[Certifier]) -> int:
    """One clean forward on a blank input of the dataset's shape, before any work: the model must run on it
    and return finite scores [1, num_classes >= 2] that every certifier can use. Returns num_classes."""
    engine = Engine(model)
    headed = [certifier.name for certifier in certifiers if certifier.own_head]
    if engine.noise_conditioned and headed:
        raise ValueError(f"{', '.join(sorted(set(headed)))} run their own heads on the noisy inputs, which do not pass "
                         f"the noise level a diffusion denoiser needs; certify it with cohen, topk, ssn or dssn")
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


def _tell_of_resize(loaded: LoadedModel) -> None:
    if loaded.resized_from is not None:
        log.info("%s takes %s inputs: the dataset's %s crops are resized in front of it (bicubic, antialiased; "
                 "noise and radii stay in the dataset's pixels)", loaded.name, _shape(loaded.input_size),
                 _shape(loaded.resized_from))


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _warn_of_labels(listing: pa.Table, num_classes: int) -> None:
    outside = pc.sum(pc.greater_equal(listing["label"], num_classes)).as_py() or 0  # negative: unlabelled
    if outside:
        log.warning("%d images have labels outside the model's classes 0..%d; they will be error rows", outside,
                    num_classes - 1)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def done_image_ids(results: pa.Table, settings: list[str]) -> set[str]:
    """Images that have an `ok` row for every one of `settings` (by setting identity: rows of other settings
    and error rows count for nothing)."""
    if results.num_rows == 0:
        return set()
    ok = results.filter(pc.and_(pc.equal(results["status"], "ok"),
                                pc.is_in(results["setting"], pa.array(sorted(set(settings)), pa.string()))))
    grouped = ok.group_by("image_id").aggregate([("setting", "count_distinct")])
    complete = pc.equal(grouped["setting_count_distinct"], len(set(settings)))
    return set(grouped.filter(complete)["image_id"].to_pylist())


def error_images(table: pa.Table) -> set[str]:
    """The images of `table` that have an error row (whatever the reason: decoding, a label outside the
    model's classes, non-finite outputs): the failures a run counts."""
    return set(table.filter(pc.equal(table["status"], "error"))["image_id"].to_pylist())


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
    num_classes = certifiers[0].num_classes(engine, torch.tensor(batch["pixels"][decoded[0]]).float() / 255)
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
    module docstring: the manifest says `failed`, `interrupted` or `incomplete`, the lease is released, and an
    outage, a failed write or an interrupt is raised as one line."""
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
        except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM through stop_on_sigterm
            code = getattr(stop, "exit_code", 130)
            how = "SIGTERM" if code == 143 else "Ctrl-C (SIGINT)"
            fail(run, stop, status="interrupted", reason=f"interrupted by {how}")
            raise Interrupted(f"run {config.run_id} interrupted by {how}; its manifest says interrupted; rerun the "
                              f"same command to go on where it stopped", code) from None
        except Exception as error:  # marks the manifest "failed"; a storage failure becomes one line
            stopped = outage_behind(error) or write_failure_behind(error)
            fail(run, stopped or error)
            if stopped is not None:  # one line, not the traceback of the task it happened in
                advice = "rerun the same command" if isinstance(stopped, StorageOutage) else \
                    "fix the storage (space, bucket, permissions), then rerun the same command"
                raise type(stopped)(f"run {config.run_id} stopped: {stopped}; {advice} to go on where it "
                                    f"stopped") from None
            raise


class Interrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C (`exit_code` 130) or SIGTERM (143, as `ray job stop` sends it); the message
    is one line."""

    def __init__(self, message: str = "interrupted", exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def stop_on_sigterm():
    """While the block runs, SIGTERM raises Interrupted (exit code 143) in the main thread, so a run stops
    as it does on Ctrl-C: manifest `interrupted`, lease released. Call `install()` on the object it yields
    again after starting Ray, whose own handler (it aborts the process) replaces this one. The handler in
    place before is restored at the end. Does nothing outside the main thread."""

    def terminated(signum, frame):
        raise Interrupted("SIGTERM", 143)

    class Handler:
        @staticmethod
        def install() -> None:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, terminated)

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    Handler.install()
    try:
        yield Handler
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def outage_behind(error: BaseException) -> StorageOutage | None:
    """The StorageOutage in `error`'s chain (itself, its `__cause__` and `__context__`, and the `cause` a
    task error of a distributed runner carries), if there is one. An exception that is a StorageOutage only
    as a wrapper of one (it has a `cause`) stands for its cause, whose message is the outage's own."""
    return _behind(error, StorageOutage)


def write_failure_behind(error: BaseException) -> WriteFailed | None:
    """The WriteFailed in `error`'s chain (as `outage_behind` finds an outage), if there is one."""
    return _behind(error, WriteFailed)


def _behind(error: BaseException, kind: type[BaseException]):
    for link in _chain(error):
        if isinstance(link, kind) and not isinstance(getattr(link, "cause", None), BaseException):
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


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def reason_of(error: BaseException) -> str:
    """One line for a manifest: the error's type and message, without terminal colour codes or traceback
    (for an error that carries a traceback's text, as a distributed task's does, its last line: the
    exception the task raised)."""
    while isinstance(getattr(error, "cause", None), BaseException):
        error = error.cause
    lines = [line.strip() for line in ANSI.sub("", str(error)).splitlines() if line.strip()]
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        return lines[-1][:1000]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:1000]


def fail(run: Run, error: BaseException, status: str = "failed", reason: str | None = None) -> None:
    """Marks the manifest `status` (`failed`, or `interrupted`) with the reason (one line: `reason_of`),
    retried as long as any write should the storage be what failed, and releases the lease."""
    run.manifest.update(status=status, reason=reason or reason_of(error), **{status: _now()})
    try:
        run.location.write_json("manifest.json", run.manifest)
    except OSError as unwritable:
        log.warning("could not mark %s/manifest.json %s: %s", run.location.uri, status, unwritable)
    run.lease.release()


class IncompleteRun(RuntimeError):
    """A run that ended without a row for every listed image and setting; a rerun certifies the missing ones."""


def finish(run: Run, counts: dict[str, int]) -> RunSummary:
    """The exactly-once and completeness checks (`check_pairs`), the finished manifest and the report;
    returns the run's summary. IncompleteRun (manifest status "incomplete") when listed images lack rows,
    as when a results file was lost during the run."""
    missing = check_pairs(run)
    if missing:
        run.manifest.update(status="incomplete", counts={**counts, "missing": len(missing)})
        run.location.write_json("manifest.json", run.manifest)
        run.lease.release()
        raise IncompleteRun(f"run {run.config.run_id}: {len(missing)} of {run.listing.num_rows} listed images have "
                            f"no rows for every setting (e.g. {', '.join(missing[:5])}); results may have been "
                            f"lost from {run.results.uri}. Rerun the same command to certify them.")
    results = read_results(run.results)
    if run.pending.num_rows:
        run.manifest["batch"] = batch_sizes(results, run.pending["image_id"])
        chosen = _batch_sizes_of(results.select(["device", "status", "params"]).slice(0, 1000).to_pylist())
        run.manifest["batch_sizes"] = {**chosen, **run.batch_sizes}
    run.manifest.update(status="finished", finished=_now(), counts={
        **counts, "rows": results.num_rows, "images": len(set(results["image_id"].to_pylist())),
        "error_rows": int(pc.sum(pc.equal(results["status"], "error")).as_py() or 0),
        "error_images": len(error_images(results))})
    run.location.write_json("manifest.json", run.manifest)
    from pipeline import report  # matplotlib: imported where the report is written, not by every actor

    summary = report.write_report(results, run.location.join("report"), run.config.report_radii, run.manifest)
    run.lease.release()
    log.info("run %s finished: %d images, %d rows; results in %s", run.config.run_id,
             run.manifest["counts"]["images"], results.num_rows, run.results.uri)
    return RunSummary(run.config.run_id, run.location, "finished", dict(run.manifest["counts"]), summary,
                      report.brief(results, run.config.report_radii, label=run.config.run_id), results)


def check_pairs(run: Run) -> list[str]:
    """The listed images that lack a row of some configured setting, sorted. Every file must still be this
    run's (`read_run_keys`: ForeignResults naming it) and no (image, setting) may have two rows (RuntimeError
    naming the files that hold them)."""
    settings = [certifier.setting for certifier in run.certifiers]
    keys = read_run_keys(run.results, run.config.run_id, settings, run.config.seed)
    pairs = keys.group_by(["image_id", "setting"]).aggregate([("file", "count"), ("file", "distinct")])
    twice = pairs.filter(pc.greater(pairs["file_count"], 1))
    if twice.num_rows:
        first = twice.slice(0, 1).to_pylist()[0]
        raise RuntimeError(f"{run.results.uri}: {twice.num_rows} (image, setting) pairs have more than one row, e.g. "
                           f"{first['image_id']} / {first['setting']} in {sorted(first['file_distinct'])}; remove "
                           f"the file(s) that do not belong to this run and rerun")
    per_image = pairs.group_by("image_id").aggregate([("setting", "count_distinct")])
    complete = per_image.filter(pc.equal(per_image["setting_count_distinct"], len(set(settings))))
    return sorted(set(run.listing["image_id"].to_pylist()) - set(complete["image_id"].to_pylist()))


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
