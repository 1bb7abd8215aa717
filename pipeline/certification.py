"""Certify a batch of images in this process: the engine samples once, every certifier reads the counts.

Each step (the counting pass, each sampling certifier) samples in a session of its own, whose record is
read once for that step's rows; what the steps share (the model's votes kept for reuse, the non-finite
outputs per image) belongs to the one call of `certify_rows` and is gone after it."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from pipeline.certifiers.base import Certificate, Certifier
from pipeline.engine import Engine
from pipeline.noise import GRID_TOLERANCE, grid_deviation, noise_scheme
from pipeline.progress import Progress
from pipeline.results import RowContext, result_row, to_table
from pipeline.sampling import Session
from pipeline.votes import Stream, VoteCache

log = logging.getLogger(__name__)

__all__ = ["certify", "certify_rows", "content_ids"]


def content_ids(images: torch.Tensor) -> list[str]:
    """Ids from the images' pixels ('sha256:' + 16 hex digits), so an image keeps its noise whatever its
    position; the k-th repeat of the same pixels gets '#k' appended."""
    seen: Counter[str] = Counter()
    ids = []
    for image in images.detach().to("cpu", torch.float32):
        digest = hashlib.sha256(image.contiguous().numpy().tobytes()).hexdigest()[:16]
        ids.append(f"sha256:{digest}" + (f"#{seen[digest]}" if seen[digest] else ""))
        seen[digest] += 1
    return ids


def _check_images(images) -> torch.Tensor:
    images = torch.as_tensor(images)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty float tensor [B, C, H, W], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a float tensor with values in [0, 1], got dtype {images.dtype}")
    if not torch.isfinite(images).all():
        raise ValueError("images must be finite; found NaN or infinity")
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"images must lie in [0, 1] (pixel space, before normalisation); found values in "
                         f"[{low:.4g}, {high:.4g}]")
    return images


def _check_labels(labels, count: int, num_classes: int) -> list[int | None]:
    if labels is None:
        return [None] * count
    if isinstance(labels, torch.Tensor | np.ndarray):
        labels = labels.reshape(-1).tolist()
    labels = [None if label is None else int(label) for label in labels]
    if len(labels) != count:
        raise ValueError(f"labels must hold one label per image: got {len(labels)} labels for {count} images")
    bad = [label for label in labels if label is not None and not 0 <= label < num_classes]
    if bad:
        raise ValueError(f"labels must lie in [0, {num_classes - 1}] for this model; got {bad[:5]}")
    return labels


def _check_ids(image_ids, count: int) -> list[str]:
    image_ids = [str(image_id) for image_id in image_ids]
    if len(image_ids) != count:
        raise ValueError(f"image_ids must hold one id per image: got {len(image_ids)} for {count} images")
    if len(set(image_ids)) != count:
        raise ValueError("image_ids must be unique: each id seeds its image's noise")
    return image_ids


Verdicts = dict[int, list[tuple[Certificate, float]]]  # certifier position -> (certificate, seconds) per image
NONFINITE = Certificate.failed("the model returned NaN or infinite outputs on this image's noisy copies")


def certify(model: torch.nn.Module, images, labels=None, certifiers: Sequence[Certifier] = (), *, seed: int = 0,
            batch_size: int | str = "auto", device: str = "cpu", precision: str = "fp32", channels_last: bool = False,
            compile: bool | str = False, image_ids: Sequence[str] | None = None, progress: bool = False) -> pa.Table:
    """Certifies every image with every certifier; returns one row per (image, certifier) in
    `pipeline.results.SCHEMA`.

    `images` is a float tensor [B, C, H, W] in [0, 1]; normalisation belongs inside `model`, so sigma and
    radii are in pixel units. `labels` (optional; entries may be None) are the true classes. The noise of
    each image is a pure function of (`seed`, its id, stage, draw index): the table does not depend on
    `batch_size` (rows per forward pass; "auto": the fastest of a short timed probe, `pipeline.batch_probe`)
    or on the order of the images. Certifiers asking for the same noise share forward passes
    (see `pipeline.certifiers`). A Gaussian certifier left at `gaussian="auto"` draws the sound noise on the
    1/255 grid when every image is on that grid (8-bit images), else the real-valued one; each row's
    `setting`, `noise` and `covers` say which. `precision`, `channels_last` and `compile` as in
    `pipeline.engine.Engine`.
    `progress` shows the certifiers done in the project's progress display (`pipeline.progress`).
    """
    engine = Engine(model, device=device, batch_size=batch_size, precision=precision, channels_last=channels_last,
                    compile=compile)
    certifiers = list(certifiers)
    if not progress:
        return to_table(certify_rows(engine, images, labels, certifiers, seed=seed, image_ids=image_ids))
    with Progress(len(certifiers), "certifiers", f"certifying {len(images)} images", logger=log) as shown:
        return to_table(certify_rows(engine, images, labels, certifiers, seed=seed, image_ids=image_ids,
                                     progress=shown))


@dataclasses.dataclass
class _Batch:
    """One `certify_rows` call's images and what its steps add up: the model's votes kept for reuse
    (`votes`) and the non-finite outputs per image id over every step (`nonfinite`)."""

    engine: Engine
    images: torch.Tensor
    image_ids: list[str]
    labels: list[int | None]
    seed: int
    votes: VoteCache
    progress: Progress | None = None
    nonfinite: Counter = dataclasses.field(default_factory=Counter)

    def session(self) -> Session:
        """A fresh record for one step (the counting pass, one sampling certifier) over the batch's votes."""
        return self.engine.session(self.votes)

    def done(self, session: Session, certifiers: int) -> None:
        """Adds a finished step's non-finite outputs to the batch's, and its certifiers to the progress."""
        self.nonfinite.update(session.nonfinite)
        if self.progress is not None:
            self.progress.update(certifiers)


def certify_rows(engine: Engine, images, labels, certifiers: Sequence[Certifier], *, seed: int,
                 image_ids: Sequence[str] | None = None, run_info: dict | None = None,
                 indices: Sequence[int] | None = None, progress: Progress | None = None) -> list[dict]:
    """`certify` on an existing engine, as result rows, image by image in certifier order: check the
    inputs; let the certifiers that feed counts sample (center smoothing); sample once for the counting
    certifiers, answering what those draws already gave; let the other sampling ones sample, their looks
    answered from all counts so far; build the rows. Each step runs in a session of its own, whose record
    gives its rows' accounting: each row's `shared_passes` (params) says how many of its forward passes an
    earlier one in that order paid for, so the image's rows' forward_passes less their shared_passes add
    up to the passes run. `run_info` fills the run columns; `indices` (default: the positions) the
    `image_index` column; `progress`, when given, counts the certifiers done."""
    certifiers = _check_certifiers(certifiers)
    images = _check_images(images)
    on_grid = bool((grid_deviation(images) <= GRID_TOLERANCE).all())
    certifiers = [certifier.for_inputs(on_grid) for certifier in certifiers]  # gaussian="auto" resolved
    image_ids = content_ids(images) if image_ids is None else _check_ids(image_ids, len(images))
    labels, num_classes = _check_inputs(engine, images, image_ids, labels, certifiers)
    labeled = all(label is not None for label in labels)
    # in this order, each step answers what the votes kept by the steps before it already drew
    batch = _Batch(engine, images, image_ids, labels, seed, VoteCache(_wanted(certifiers, labeled)), progress)
    verdicts = _sampled(batch, certifiers, feeding=True)
    verdicts |= _counted(batch, certifiers)
    verdicts |= _sampled(batch, certifiers, feeding=False)
    _fail_nonfinite(batch.nonfinite, image_ids, verdicts)
    context = RowContext(seed=seed, precision=engine.precision, device=engine.device.type,
                         settings={"noise_scheme": noise_scheme(engine.device), **engine.settings()},
                         run=run_info or {}, input_shape=tuple(images.shape[1:]),
                         num_classes=num_classes)
    indices = range(len(images)) if indices is None else indices
    rows = []
    for index, (image_index, image_id, label) in enumerate(zip(indices, image_ids, labels, strict=True)):
        for position, certifier in enumerate(certifiers):
            certificate, seconds = verdicts[position][index]
            rows.append(result_row(certifier, certificate, int(image_index), image_id, label, seconds, context))
    return rows


def _run(certifier: Certifier, batch: _Batch) -> tuple[list[Certificate], Session]:
    """A sampling certifier's certificates and the session they were sampled in. When images with
    non-finite outputs stopped it (their counts miss draws), it runs again on the others alone, in a fresh
    session; they get the same noise and so the same certificates."""
    images, image_ids, labels = batch.images, batch.image_ids, batch.labels
    session = batch.session()
    try:
        return certifier.run(session, images, image_ids, batch.seed, labels), session
    except ValueError:
        batch.nonfinite.update(session.nonfinite)
        finite = [i for i, image_id in enumerate(image_ids) if not batch.nonfinite.get(image_id)]
        if len(finite) == len(image_ids):
            raise
    session = batch.session()
    certificates = certifier.run(session, images[finite], [image_ids[i] for i in finite], batch.seed,
                                 [labels[i] for i in finite]) if finite else []
    by_image = dict(zip(finite, certificates, strict=True))
    return [by_image.get(index, NONFINITE) for index in range(len(image_ids))], session


def _fail_nonfinite(nonfinite: Counter, image_ids: Sequence[str], verdicts: Verdicts) -> None:
    """An image on which the model returned NaN or infinite scores has no certificate (those draws cannot
    vote): every one of its certificates becomes a failed one naming the cause."""
    for index, image_id in enumerate(image_ids):
        bad = nonfinite.get(image_id, 0)
        if bad:
            failed = Certificate.failed(f"the model returned NaN or infinite outputs on {bad} of this image's "
                                        f"noisy copies (or the sound sampler rejected them); no certificate")
            for position in verdicts:
                verdicts[position][index] = (failed, verdicts[position][index][1])


def _check_certifiers(certifiers: Sequence[Certifier]) -> list[Certifier]:
    certifiers = list(certifiers)
    if not certifiers:
        raise ValueError("certifiers: give at least one certifier, e.g. Cohen(sigma=0.25)")
    for certifier in certifiers:
        if not isinstance(certifier, Certifier):
            raise ValueError(f"certifiers must be Certifier instances, got {certifier!r}")
    return certifiers


def _check_inputs(engine, images, image_ids, labels, certifiers) -> tuple[list[int | None], int]:
    """The labels, checked against the model's classes, and the class count; raises when a certifier cannot
    take the inputs."""
    num_classes = certifiers[0].num_classes(engine, images[0])
    labels = _check_labels(labels, len(images), num_classes)
    for certifier in certifiers:
        certifier.check_num_classes(num_classes)
        certifier.check_images(images, image_ids)
    return labels, num_classes


def _wanted(certifiers: Sequence[Certifier], labeled: bool) -> dict[Stream, list[int]]:
    """Per noise stream, the draw counts whose votes some certifier asks for: the counting certifiers'
    requests and the sampling certifiers' `reusable_draws`."""
    wanted: dict[Stream, set[int]] = {}
    for certifier in certifiers:
        draws = certifier.reusable_draws(labeled) if certifier.self_sampling else certifier.draws(labeled).values()
        for request in draws:
            wanted.setdefault(request.stream, set()).add(request.n)
    return {stream: sorted(ns) for stream, ns in wanted.items()}


def _counted(batch: _Batch, certifiers: Sequence[Certifier]) -> Verdicts:
    """The counting certifiers' certificates from one sampling pass over all their requests (shared
    streams sampled once, prefixes that the feeding certifiers drew answered from their votes), plus the
    sampling certifiers' `reusable_draws` this pass draws anyway; each row's time is its share of the
    sampling plus its own math."""
    counting = {position: certifier for position, certifier in enumerate(certifiers) if not certifier.self_sampling}
    if not counting:
        return {}
    labeled = all(label is not None for label in batch.labels)
    roles = {position: certifier.draws(labeled) for position, certifier in counting.items()}
    requests = list(dict.fromkeys(draws for group in roles.values() for draws in group.values()))
    drawn: dict[Stream, int] = {}
    for draws in requests:
        drawn[draws.stream] = max(drawn.get(draws.stream, 0), draws.n)
    requests += [draws for certifier in certifiers if certifier.self_sampling
                 for draws in certifier.reusable_draws(labeled) if draws.n <= drawn.get(draws.stream, 0)]
    requests = list(dict.fromkeys(requests))
    log.debug("certifying %d images: %d noise streams, batch %s on %s", len(batch.images),
              len({draws.stream for draws in requests}), batch.engine.batch_size, batch.engine.device)
    session = batch.session()
    counts = session.count(batch.images, batch.image_ids, batch.seed, requests)
    batch.done(session, len(counting))
    seconds_per_pass = session.seconds / max(1, session.forward_passes)
    verdicts: Verdicts = {}
    for index, image_id in enumerate(batch.image_ids):
        paid = {draws.stream: session.reused.get((image_id, draws.stream), 0) for draws in requests}
        for position, certifier in counting.items():
            started = time.perf_counter()
            if batch.nonfinite.get(image_id):  # its counts miss the draws that could not vote
                certificate = NONFINITE
            else:
                certificate = certifier.certify({role: counts[draws][index] for role, draws in roles[position].items()},
                                                batch.labels[index])
            shared = sum(min(draws.n, paid[draws.stream]) for draws in roles[position].values())
            new = sum(draws.n for draws in roles[position].values()) - shared
            for draws in roles[position].values():
                paid[draws.stream] = max(paid[draws.stream], draws.n)
            seconds = new * seconds_per_pass + time.perf_counter() - started
            verdicts.setdefault(position, []).append((_with_shared(certificate, shared), seconds))
    return verdicts


def _with_shared(certificate: Certificate, shared: int) -> Certificate:
    """The certificate with `shared_passes` in its details: how many of its forward passes another row of the
    same image paid for (their counts were reused)."""
    if not shared:
        return certificate
    return dataclasses.replace(certificate, details={**(certificate.details or {}), "shared_passes": shared})


def _sampled(batch: _Batch, certifiers: Sequence[Certifier], feeding: bool) -> Verdicts:
    """The certificates of the sampling certifiers that feed counts (`feeding`) or of the others, each
    certifier's time shared out by the forward passes its certificates' costs state; `shared_passes` are
    the draws its session answered from earlier votes."""
    verdicts: Verdicts = {}
    for position, certifier in enumerate(certifiers):
        if certifier.self_sampling and certifier.feeds_counts == feeding:
            started = time.perf_counter()
            certificates, session = _run(certifier, batch)
            batch.done(session, 1)
            certificates = [_with_shared(certificate, session.shared_passes(image_id))
                            for certificate, image_id in zip(certificates, batch.image_ids, strict=True)]
            seconds = time.perf_counter() - started
            total = max(1, sum(certificate.cost.forward_passes for certificate in certificates))
            verdicts[position] = [(certificate, seconds * certificate.cost.forward_passes / total)
                                  for certificate in certificates]
    return verdicts
