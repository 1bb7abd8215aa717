"""The few-sample setting: a seeded subset of the training data, with a held-out validation split.

Checkpoints are selected on the validation split carved from the subset, never on the test set.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.data.preprocess import ImageError, decode
from pipeline.data.sources import DatasetSpec, list_images, read_encoded
from pipeline.storage import DEFAULT_STORAGE, Storage

__all__ = ["few_sample_subset", "load_training_images"]


def few_sample_subset(labels, per_class: int | None = None, fraction: float | None = None, seed: int = 3,
                      validation: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): `per_class` images of every class (or round(fraction * N / classes)),
    drawn uniformly within each class with `seed`; `validation` of each class's draw is held out (at least one
    image per class stays for training)."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if (per_class is None) == (fraction is None):
        raise ValueError("subset: give exactly one of per_class or fraction")
    if per_class is None:
        if not 0 < fraction <= 1:
            raise ValueError(f"subset.fraction must lie in (0, 1], got {fraction!r}")
        per_class = max(1, round(fraction * len(labels) / len(classes)))
    rng = np.random.default_rng(seed)
    train, held_out = [], []
    for label in classes:
        members = np.flatnonzero(labels == label)
        if per_class > len(members):
            raise ValueError(f"subset: {per_class} images per class asked for, but class {label} has only "
                             f"{len(members)}")
        chosen = rng.choice(members, size=per_class, replace=False)
        count = min(per_class - 1, math.floor(validation * per_class + 0.5)) if per_class > 1 else 0
        held_out.extend(chosen[:count])
        train.extend(chosen[count:])
    return np.sort(train), np.sort(held_out)


def load_training_images(dataset: DatasetSpec, storage: Storage = DEFAULT_STORAGE
                         ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(images float [N, C, H, W] in [0, 1], labels, ids) of a dataset entry of any layout, decoded here
    with the dataset's transform (the same as certification's). An image that cannot be decoded is an error
    naming it."""
    listing = list_images(dataset, storage)
    ids = listing["image_id"].to_pylist()
    pixels = []
    for image_id, data in zip(ids, read_encoded(dataset, listing, storage), strict=True):
        try:
            pixels.append(decode(data, dataset.transform))
        except ImageError as error:
            raise ValueError(f"training image {image_id}: {error}") from error
    return torch.from_numpy(np.stack(pixels)).float() / 255, torch.as_tensor(listing["label"].to_pylist()), ids
