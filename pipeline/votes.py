"""Noise streams, sampling requests, and the model's votes kept for reuse within one batch of images.

A draw is a pure function of (seed, image id, stream, index), so the top-1 votes the model cast on the
draws [0, n) of a stream are exactly the counts any later request for those draws would find. A
`VoteCache` keeps such counts at the draw counts some certifier asks for (`wanted`) and answers later
requests from them; it belongs to one batch of images and holds nothing else. `Stream` names a stream
(`Draws.stream`); requests on one stream share their draws.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Draws", "Stream", "Tally", "VoteCache"]


@dataclass(frozen=True)
class Stream:
    """A noise stream: draws of `stage` at scale `sigma`, of kind `noise` ("gaussian", "sound_gaussian", "ssn",
    "dssn"; see `pipeline.noise`) with `options` as (name, value) pairs."""

    stage: str
    sigma: float
    noise: str = "gaussian"
    options: tuple = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma", float(self.sigma))


@dataclass(frozen=True)
class Draws:
    """A sampling request: `n` noisy copies of every image from the noise stream `stage`, of kind `noise`
    at scale `sigma`, with `options` as (name, value) pairs."""

    stage: str
    sigma: float
    n: int
    noise: str = "gaussian"
    options: tuple = ()

    @property
    def stream(self) -> Stream:
        return Stream(self.stage, self.sigma, self.noise, self.options)


class VoteCache:
    """The model's top-1 vote counts on the draws [0, n) of a stream, per image, at the draw counts n in
    `wanted[stream]`: kept as sampling finds them, read to answer requests for the same draws."""

    def __init__(self, wanted: Mapping[Stream, Iterable[int]] | None = None):
        self.wanted: dict[Stream, list[int]] = {stream: sorted(set(ns)) for stream, ns in (wanted or {}).items()}
        self._known: dict[tuple[str, Stream], dict[int, np.ndarray]] = {}

    def prefixes(self, image_id: str, stream: Stream) -> dict[int, np.ndarray]:
        """{n: counts of draws [0, n)} known for the image on the stream."""
        return self._known.get((image_id, stream), {})

    def answer(self, image_id: str, stream: Stream, start: int, end: int) -> tuple[int, np.ndarray | None]:
        """(p, the counts of draws [start, p)) for the largest known prefix p <= end, when the counts at
        `start` are known too; (start, None) when nothing is."""
        prefixes = self.prefixes(image_id, stream)
        first = prefixes.get(start) if start else 0
        known = max((n for n in prefixes if start < n <= end), default=None)
        if known is None or first is None:
            return start, None
        return known, prefixes[known] - first

    def keep(self, image_id: str, stream: Stream, prefixes: Mapping[int, np.ndarray]) -> None:
        """Keeps {n: counts of draws [0, n)} of the image on the stream."""
        if prefixes:
            self._known.setdefault((image_id, stream), {}).update(prefixes)

    def keep_counted(self, image_ids: Sequence[str], cuts: Mapping[Stream, list[int]],
                     first_slot: Mapping[Stream, int], per_slot: np.ndarray) -> None:
        """Keeps the counts that a count found at every wanted cut: `per_slot` [images, slots, classes] holds
        the votes of the draws between consecutive `cuts[stream]`, from slot `first_slot[stream]` on."""
        for stream, ends in cuts.items():
            keep = set(self.wanted.get(stream, ()))
            if not keep:
                continue
            start = first_slot[stream]
            cumulative = per_slot[:, start:start + len(ends)].cumsum(axis=1)
            for image, image_id in enumerate(image_ids):
                self.keep(image_id, stream, {end: cumulative[image, j] for j, end in enumerate(ends) if end in keep})


class Tally:
    """Top-1 vote counts of each image at given cuts of one stream (draws [0, cut) for each cut)."""

    def __init__(self, cuts: list[int], images: int, device: torch.device):
        self.cuts, self.images, self.device = cuts, images, device
        self.bounds = torch.as_tensor(cuts, dtype=torch.long, device=device)
        self.counts: torch.Tensor | None = None  # [images, cuts, classes]: votes of draws in [cut j-1, cut j)

    def add(self, logits: torch.Tensor, images: torch.Tensor, draws: torch.Tensor,
            rejected: torch.Tensor | None = None) -> None:
        """Counts the votes of a batch; draws in `rejected` (rejected by the sampler) vote for no class."""
        if not self.cuts:
            return
        classes = logits.shape[1]
        if self.counts is None:
            self.counts = torch.zeros((self.images, len(self.cuts), classes), dtype=torch.int64, device=self.device)
        segment = torch.searchsorted(self.bounds, draws, right=True)  # cuts <= draw: the draw counts beyond them
        counted = torch.isfinite(logits).all(dim=1) & (segment < len(self.cuts))  # NaN or inf scores never vote
        if rejected is not None:
            counted &= ~rejected
        flat = (images * len(self.cuts) + segment.clamp(max=len(self.cuts) - 1)) * classes + logits.argmax(dim=1)
        self.counts.view(-1).index_add_(0, flat, counted.long())

    def known(self, image_ids: Sequence[str]) -> dict[str, dict[int, np.ndarray]]:
        """{image id: {cut: vote counts of draws [0, cut)}}."""
        if self.counts is None:
            return {}
        cumulative = self.counts.cumsum(dim=1).cpu().numpy()
        return {image_id: {cut: cumulative[image, j] for j, cut in enumerate(self.cuts)}
                for image, image_id in enumerate(image_ids)}
