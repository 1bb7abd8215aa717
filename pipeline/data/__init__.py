"""Dataset readers. For now: the embedded demo set, with the papers' evaluation subsample."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.data.demo import load_demo

__all__ = ["load_dataset", "subsample"]


def subsample(count: int, skip: int = 1, max_index: int | None = None) -> list[int]:
    """Dataset indices certified by the papers' protocol: every `skip`-th index, stopping at index `max_index`."""
    if skip < 1:
        raise ValueError(f"dataset.skip must be >= 1, got {skip!r}")
    stop = count if max_index is None else min(count, max_index)
    return list(range(0, stop, skip))


def load_dataset(spec: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(images float [N, C, H, W] in [0, 1], labels, ids) for a dataset entry of a run config."""
    settings = dict(spec)
    name = settings.pop("name")
    skip, max_index = settings.pop("skip", 1), settings.pop("max", None)
    if name != "demo":
        raise ValueError(f"dataset.name: unknown dataset {name!r}")
    images, labels, ids = load_demo(**settings)
    keep = subsample(len(images), skip, max_index)
    return images[keep].float() / 255, labels[keep], [ids[i] for i in keep]
