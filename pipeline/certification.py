"""Certify a batch of images in this process: the engine samples once, every certifier reads the counts."""

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
from pipeline.noise import noise_scheme
from pipeline.results import RowContext, result_row, to_table

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
    (see `pipeline.certifiers`). `precision`, `channels_last` and `compile` as in `pipeline.engine.Engine`.
    """
    engine = Engine(model, device=device, batch_size=batch_size, precision=precision, channels_last=channels_last,
                    compile=compile, progress=progress)
    return to_table(certify_rows(engine, images, labels, certifiers, seed=seed, image_ids=image_ids))


def certify_rows(engine: Engine, images, labels, certifiers: Sequence[Certifier], *, seed: int,
                 image_ids: Sequence[str] | None = None, run_info: dict | None = None,
                 indices: Sequence[int] | None = None) -> list[dict]:
    """`certify` on an existing engine, as result rows, image by image in certifier order: check the
    inputs; let the certifiers that feed counts sample (center smoothing); sample once for the counting
    certifiers, answering what those draws already gave; let the other sampling ones sample, their looks
    answered from all counts so far; build the rows. Each row's `shared_passes` (params) says how many
    of its forward passes an earlier one in that order paid for, so the image's rows' forward_passes less
    their shared_passes add up to the passes run.
    `run_info` fills the run columns; `indices` (default: the positions) the `image_index` column."""
    certifiers = _check_certifiers(certifiers)
    images = _check_images(images)
    image_ids = content_ids(images) if image_ids is None else _check_ids(image_ids, len(images))
    labels = _check_inputs(engine, images, image_ids, labels, certifiers)
    for image_id in image_ids:  # counted afresh for this call
        engine.nonfinite.pop(image_id, None)
    labeled = all(label is not None for label in labels)
    with engine.reusing(_wanted(certifiers, labeled)):  # in this order, each pass reuses the votes before it
        verdicts = _sampled(engine, images, image_ids, labels, seed, certifiers, feeding=True)
        verdicts |= _counted(engine, images, image_ids, labels, seed, certifiers)
        verdicts |= _sampled(engine, images, image_ids, labels, seed, certifiers, feeding=False)
    _fail_nonfinite(engine, image_ids, verdicts)
    context = RowContext(seed=seed, precision=engine.precision, device=engine.device.type,
                         settings={"noise_scheme": noise_scheme(engine.device), **engine.settings()},
                         run=run_info or {}, input_shape=tuple(images.shape[1:]),
                         num_classes=certifiers[0].num_classes(engine, images[0]))
    indices = range(len(images)) if indices is None else indices
    rows = []
    for index, (image_index, image_id, label) in enumerate(zip(indices, image_ids, labels, strict=True)):
        for position, certifier in enumerate(certifiers):
            certificate, seconds = verdicts[position][index]
            rows.append(result_row(certifier, certificate, int(image_index), image_id, label, seconds, context))
    return rows


def _run(certifier: Certifier, engine: Engine, images, image_ids, seed, labels) -> list[Certificate]:
    """A sampling certifier's certificates. When images with non-finite outputs stopped it (their counts miss
    draws), it runs again on the others alone, which get the same noise and so the same certificates."""
    try:
        return certifier.run(engine, images, image_ids, seed, labels)
    except ValueError:
        finite = [i for i, image_id in enumerate(image_ids) if not engine.nonfinite.get(image_id)]
        if len(finite) == len(image_ids):
            raise
    engine.reused.clear()
    certificates = certifier.run(engine, images[finite], [image_ids[i] for i in finite], seed,
                                 [labels[i] for i in finite]) if finite else []
    by_image = dict(zip(finite, certificates, strict=True))
    return [by_image.get(index, NONFINITE) for index in range(len(image_ids))]


def _fail_nonfinite(engine: Engine, image_ids: Sequence[str], verdicts: Verdicts) -> None:
    """An image on which the model returned NaN or infinite scores has no certificate (those draws cannot
    vote): every one of its certificates becomes a failed one naming the cause."""
    for index, image_id in enumerate(image_ids):
        bad = engine.nonfinite.pop(image_id, 0)
        if bad:
            failed = Certificate.failed(f"the model returned NaN or infinite outputs on {bad} of this image's "
                                        f"noisy copies; no certificate")
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


def _check_inputs(engine, images, image_ids, labels, certifiers) -> list[int | None]:
    """The labels, checked against the model's classes; raises when a certifier cannot take the inputs."""
    num_classes = certifiers[0].num_classes(engine, images[0])
    labels = _check_labels(labels, len(images), num_classes)
    for certifier in certifiers:
        certifier.check_num_classes(num_classes)
        certifier.check_images(images, image_ids)
    return labels


def _wanted(certifiers: Sequence[Certifier], labeled: bool) -> dict[tuple, list[int]]:
    """Per noise stream, the draw counts whose votes some certifier asks for: the counting certifiers'
    requests and the sampling certifiers' `reusable_draws`."""
    wanted: dict[tuple, set[int]] = {}
    for certifier in certifiers:
        draws = certifier.reusable_draws(labeled) if certifier.self_sampling else certifier.draws(labeled).values()
        for request in draws:
            wanted.setdefault(request.stream, set()).add(request.n)
    return {stream: sorted(ns) for stream, ns in wanted.items()}


def _counted(engine, images, image_ids, labels, seed, certifiers) -> Verdicts:
    """The counting certifiers' certificates from one sampling pass over all their requests (shared
    streams sampled once, prefixes that the feeding certifiers drew answered from their votes), plus the
    sampling certifiers' `reusable_draws` this pass draws anyway; each row's time is its share of the
    sampling plus its own math."""
    counting = {position: certifier for position, certifier in enumerate(certifiers) if not certifier.self_sampling}
    if not counting:
        return {}
    labeled = all(label is not None for label in labels)
    roles = {position: certifier.draws(labeled) for position, certifier in counting.items()}
    requests = list(dict.fromkeys(draws for group in roles.values() for draws in group.values()))
    drawn: dict[tuple, int] = {}
    for draws in requests:
        drawn[draws.stream] = max(drawn.get(draws.stream, 0), draws.n)
    requests += [draws for certifier in certifiers if certifier.self_sampling
                 for draws in certifier.reusable_draws(labeled) if draws.n <= drawn.get(draws.stream, 0)]
    requests = list(dict.fromkeys(requests))
    log.debug("certifying %d images: %d noise streams, batch %s on %s", len(images),
              len({draws.stream for draws in requests}), engine.batch_size, engine.device)
    seconds_before, passes_before = engine.seconds, engine.forward_passes
    engine.reused.clear()
    counts = engine.count(images, image_ids, seed, requests)
    seconds_per_pass = (engine.seconds - seconds_before) / max(1, engine.forward_passes - passes_before)
    verdicts: Verdicts = {}
    for index, image_id in enumerate(image_ids):
        paid = {draws.stream: engine.reused.get((image_id, draws.stream), 0) for draws in requests}
        for position, certifier in counting.items():
            started = time.perf_counter()
            if engine.nonfinite.get(image_id):  # its counts miss the draws that could not vote
                certificate = NONFINITE
            else:
                certificate = certifier.certify({role: counts[draws][index] for role, draws in roles[position].items()},
                                                labels[index])
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


def _sampled(engine, images, image_ids, labels, seed, certifiers, feeding: bool) -> Verdicts:
    """The certificates of the sampling certifiers that feed counts (`feeding`) or of the others, each
    certifier's time shared out by forward passes; `shared_passes` are the draws the engine answered from
    earlier votes."""
    verdicts: Verdicts = {}
    for position, certifier in enumerate(certifiers):
        if certifier.self_sampling and certifier.feeds_counts == feeding:
            started = time.perf_counter()
            engine.reused.clear()
            certificates = _run(certifier, engine, images, image_ids, seed, labels)
            certificates = [_with_shared(certificate, sum(n for (reused_id, _), n in engine.reused.items()
                                                          if reused_id == image_id))
                            for certificate, image_id in zip(certificates, image_ids, strict=True)]
            seconds = time.perf_counter() - started
            total = max(1, sum(certificate.cost.forward_passes for certificate in certificates))
            verdicts[position] = [(certificate, seconds * certificate.cost.forward_passes / total)
                                  for certificate in certificates]
    return verdicts
