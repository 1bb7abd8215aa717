"""Certify a batch of images in this process: the engine samples once, every certifier reads the counts."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from pipeline.certifiers.base import Certifier
from pipeline.engine import Engine
from pipeline.noise import noise_scheme
from pipeline.results import CERTIFIER_EXTRAS, RUN_COLUMNS, to_table

log = logging.getLogger(__name__)

__all__ = ["certify", "content_ids"]


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




def certify(model: torch.nn.Module, images, labels=None, certifiers: Sequence[Certifier] = (), *, seed: int = 0,
            batch_size: int = 1000, device: str = "cpu", precision: str = "fp32", channels_last: bool = False,
            compile: bool | str = False, image_ids: Sequence[str] | None = None, progress: bool = False) -> pa.Table:
    """Certifies every image with every certifier; returns one row per (image, certifier) in
    `pipeline.results.SCHEMA`.

    `images` is a float tensor [B, C, H, W] in [0, 1]; normalisation belongs inside `model`, so sigma and
    radii are in pixel units. `labels` (optional; entries may be None) are the true classes. The noise of
    each image is a pure function of (`seed`, its id, stage, draw index): the table does not depend on
    `batch_size` or on the order of the images. Certifiers asking for the same noise share forward passes
    (see `pipeline.certifiers`). `precision`, `channels_last` and `compile` as in `pipeline.engine.Engine`.
    """
    engine = Engine(model, device=device, batch_size=batch_size, precision=precision, channels_last=channels_last,
                    compile=compile, progress=progress)
    return to_table(certify_rows(engine, images, labels, certifiers, seed=seed, image_ids=image_ids))


def certify_rows(engine: Engine, images, labels, certifiers: Sequence[Certifier], *, seed: int,
                 image_ids: Sequence[str] | None = None, run_info: dict | None = None) -> list[dict]:
    """`certify` on an existing engine, as result rows; `run_info` fills the run columns."""
    certifiers = list(certifiers)
    if not certifiers:
        raise ValueError("certifiers: give at least one certifier, e.g. Cohen(sigma=0.25)")
    for certifier in certifiers:
        if not isinstance(certifier, Certifier):
            raise ValueError(f"certifiers must be Certifier instances, got {certifier!r}")
    images = _check_images(images)
    image_ids = content_ids(images) if image_ids is None else _check_ids(image_ids, len(images))
    num_classes = certifiers[0].num_classes(engine, images[0])
    labels = _check_labels(labels, len(images), num_classes)
    for certifier in certifiers:
        certifier.check_num_classes(num_classes)
        certifier.check_images(images, image_ids)

    labeled = all(label is not None for label in labels)
    settings = {"noise_scheme": noise_scheme(engine.device), **engine.settings()}
    shape = tuple(images.shape[1:])
    context = {"seed": seed, "precision": engine.precision, "device": engine.device.type,
               **{key: (run_info or {}).get(key) for key in RUN_COLUMNS}}

    def row(index: int, certifier: Certifier, certificate, n: int, n0: int, passes: int, seconds: float) -> dict:
        label = labels[index]
        correct = None
        if certifier.classifies and label is not None:
            correct = not certificate.abstained and certificate.prediction == label
        return {
            "image_index": index, "image_id": image_ids[index], "label": label, "certifier": certifier.name,
            "setting": certifier.setting, "sigma": float(certifier.sigma), "prediction": certificate.prediction,
            "abstained": certificate.abstained, "radius": certificate.radius, "norm": certifier.norm,
            "p_lower": certificate.p_lower, "count": certificate.count, "n": n, "n0": n0,
            "alpha": float(certifier.failure_probability), "correct": correct, "topk_labels": certificate.topk_labels,
            "forward_passes": passes, "wall_time_s": seconds, "status": "ok", "error": None,
            "params": json.dumps({**certifier.params(shape), **settings, **(certificate.details or {})},
                                 sort_keys=True),
            **dict.fromkeys(CERTIFIER_EXTRAS), **(certificate.extra or {}), **context,
        }

    counted = [certifier for certifier in certifiers if not certifier.self_sampling]
    own_draws = [certifier.draws(labeled) for certifier in counted]
    requests = list(dict.fromkeys(draws for group in own_draws for draws in group))
    log.debug("certifying %d images with %s: %d noise streams, batch %d on %s", len(images),
              ", ".join(c.name for c in certifiers), len({d.stream for d in requests}),
              engine.batch_size, engine.device)
    rows_by_certifier: dict[int, list[dict]] = {}
    if counted:
        seconds_before = engine.seconds
        counts = engine.count(images, image_ids, seed, requests)
        passes = [sum(draws.n for draws in group) for group in own_draws]
        seconds_per_pass = (engine.seconds - seconds_before) / (len(images) * sum(passes))
        for certifier, group, forward_passes in zip(counted, own_draws, passes, strict=True):
            n0 = sum(draws.n for draws in group if draws.stage == "selection")
            rows_by_certifier[id(certifier)] = []
            for index in range(len(images)):
                started = time.perf_counter()
                certificate = certifier.certify({draws: counts[draws][index] for draws in group}, labels[index])
                seconds = forward_passes * seconds_per_pass + time.perf_counter() - started
                rows_by_certifier[id(certifier)].append(
                    row(index, certifier, certificate, forward_passes - n0, n0, forward_passes, seconds))
    for certifier in certifiers:
        if certifier.self_sampling:
            started = time.perf_counter()
            certificates = certifier.run(engine, images, image_ids, seed, labels)
            seconds = time.perf_counter() - started
            budget, planned_n0 = certifier.draw_counts()
            draws = [budget if certificate.draws is None else certificate.draws for certificate in certificates]
            n0s = [planned_n0 if certificate.selection_draws is None else certificate.selection_draws
                   for certificate in certificates]
            passes = [certificate.forward_passes or n + n0
                      for certificate, n, n0 in zip(certificates, draws, n0s, strict=True)]
            rows_by_certifier[id(certifier)] = [  # wall time shared out by forward passes
                row(index, certifier, certificate, n, n0, forward_passes, seconds * forward_passes / sum(passes))
                for index, (certificate, n, n0, forward_passes)
                in enumerate(zip(certificates, draws, n0s, passes, strict=True))]
    return [rows_by_certifier[id(certifier)][index] for index in range(len(images)) for certifier in certifiers]
