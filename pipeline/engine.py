"""The batched smoothing core: noisy copies of many images through one model, counted on the device.

The engine turns requests ("n draws of stage s at scale sigma for every image") into per-image class
counts of the model's top-1 prediction. It packs (image, draw) work from all images and all requests
into full batches of `batch_size`, runs the model once per batch under `torch.inference_mode()`, and
adds each batch's predictions into a count tensor on the device with one `index_add_`: no Python loop
over predictions and no host synchronisation until the counts are read at the end.

Requests that share (stage, sigma, noise) share their draws: draw i of a stream is the same tensor for every
request (see `pipeline.noise`), so n = 1,000 and n = 10,000 on one stream cost 10,000 forward passes,
and the smaller count is the prefix of the larger. The engine knows nothing of certificates or Ray.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.noise import DRAWS_PER_BLOCK, make_noise

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}

__all__ = ["PRECISIONS", "Draws", "Engine"]


@dataclass(frozen=True)
class Draws:
    """A sampling request: `n` noisy copies of every image from the noise stream `stage`, of kind `noise`
    ("gaussian", "ssn", "dssn"; see `pipeline.noise`) at scale `sigma`, with `options` as (name, value) pairs."""

    stage: str
    sigma: float
    n: int
    noise: str = "gaussian"
    options: tuple = ()

    @property
    def stream(self) -> tuple:
        return (self.stage, float(self.sigma), self.noise, self.options)


class Engine:
    """Runs a classifier on noisy copies of images and counts its top-1 predictions.

    `precision="bf16"` runs the model under bf16 autocast. The noise is drawn in fp32 and added to the
    image before any rounding, so the counts are exact samples of the reduced-precision classifier:
    certificates then hold for that classifier, not for its fp32 original.
    """

    def __init__(self, model: torch.nn.Module, *, device: str | torch.device = "cpu", batch_size: int = 1000,
                 precision: str = "fp32", progress: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.batch_size = int(batch_size)
        self.precision = precision
        self.progress = progress
        self.forward_passes = 0
        self.seconds = 0.0
        self._num_classes: int | None = None

    def forward(self, function, inputs: torch.Tensor) -> torch.Tensor:
        """`function(inputs)` under inference mode and the configured precision."""
        dtype = PRECISIONS[self.precision]
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=dtype or torch.float32,
                                                    enabled=dtype is not None):
            return function(inputs)

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """The model's output on a batch, under inference mode and the configured precision."""
        return self.forward(self.model, inputs)

    def num_classes(self, image: torch.Tensor) -> int:
        """Probes the model once, on one clean image, and checks that it returns one score per class."""
        if self._num_classes is None:
            out = self.logits(image[None].to(self.device, torch.float32))
            if out.ndim != 2 or out.shape[0] != 1 or out.shape[1] < 2:
                raise ValueError(f"the model must map a batch [B, C, H, W] to class scores [B, num_classes >= 2];"
                                 f" it returned shape {tuple(out.shape)}")
            self._num_classes = int(out.shape[1])
        return self._num_classes

    def count(self, images: torch.Tensor, image_ids: Sequence[str], seed: int, requests: Sequence[Draws],
              head=None, batch_size: int | None = None) -> dict[Draws, np.ndarray]:
        """Class counts of the model's prediction on noisy copies of each image, one array [B, C] per request.

        `head(inputs, image_index)`, when given, replaces the model's scores (for classifiers built around
        the model, such as patch ensembles); `batch_size` overrides the noisy copies per forward pass.
        """
        started = time.perf_counter()
        self._check(images, image_ids)
        if head is None:
            num_classes = self.num_classes(images[0])
        else:
            probe = images[:1].to(self.device, torch.float32)
            num_classes = int(self.forward(lambda x: head(x, torch.zeros(1, dtype=torch.long, device=self.device)),
                                           probe).shape[1])

        # One stream per (stage, sigma, noise); each is cut at every requested n into segments, one count slot each.
        streams: dict[tuple, list[int]] = {}
        for draws in requests:
            if draws.n < 0:
                raise ValueError(f"a request needs n >= 0 draws, got {draws}")
            streams.setdefault(draws.stream, []).append(draws.n)
        cuts = {key: sorted(set(ns) - {0}) for key, ns in streams.items()}
        first_slot, slots_per_image = {}, 0
        for key, ends in cuts.items():
            first_slot[key] = slots_per_image
            slots_per_image += len(ends)

        counts = torch.zeros(len(images) * slots_per_image * num_classes, dtype=torch.int64, device=self.device)
        ones = torch.ones(batch_size or self.batch_size, dtype=torch.int64, device=self.device)

        def add_votes(inputs: torch.Tensor, slots: torch.Tensor, draws: torch.Tensor) -> None:
            if head is None:
                scores = self.logits(inputs)
            else:
                scores = self.forward(lambda x: head(x, torch.div(slots, slots_per_image, rounding_mode="floor")),
                                      inputs)
            counts.index_add_(0, slots * num_classes + scores.argmax(dim=1), ones[:len(inputs)])

        if slots_per_image:
            self._run(images, image_ids, seed, cuts, first_slot, slots_per_image, add_votes, batch_size)
        per_slot = counts.view(len(images), slots_per_image, num_classes).cpu().numpy()
        self.seconds += time.perf_counter() - started

        result = {}
        for draws in requests:
            key = draws.stream
            used = cuts[key].index(draws.n) + 1 if draws.n else 0
            start = first_slot[key]
            result[draws] = per_slot[:, start:start + used].sum(axis=1)
        return result

    def outputs(self, images: torch.Tensor, image_ids: Sequence[str], seed: int, draws: Draws, head,
                sink) -> None:
        """Runs `head` on the `draws.n` noisy copies of every image, batched like `count`; calls
        `sink(outputs, image_index, draw_index)` for each batch, the indices as device tensors."""
        started = time.perf_counter()
        self._check(images, image_ids)

        def forward(inputs: torch.Tensor, slots: torch.Tensor, draw_index: torch.Tensor) -> None:
            sink(self.forward(head, inputs), slots, draw_index)

        if draws.n:
            self._run(images, image_ids, seed, {draws.stream: [draws.n]}, {draws.stream: 0}, 1, forward)
        self.seconds += time.perf_counter() - started

    @staticmethod
    def _check(images: torch.Tensor, image_ids: Sequence[str]) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must have shape [B, C, H, W], got {tuple(images.shape)}")
        if len(image_ids) != len(images):
            raise ValueError(f"got {len(image_ids)} image ids for {len(images)} images")

    def _run(self, images, image_ids, seed, cuts, first_slot, slots_per_image, sink, batch_size=None):
        batch_size = batch_size or self.batch_size
        x = images.to(self.device, torch.float32)
        noises = {key: make_noise(key[2], x.shape[1:], self.device, key[1], key[3]) for key in cuts}
        batch = torch.empty((batch_size, *x.shape[1:]), device=self.device)
        owner = np.empty(batch_size, dtype=np.int64)
        drawn = np.empty(batch_size, dtype=np.int64)
        total = len(images) * sum(ends[-1] for ends in cuts.values())
        bar = tqdm(total=total, desc="noise draws", unit="draw", unit_scale=True, mininterval=2.0,
                   disable=not self.progress)

        runs: list[list] = []  # [first row, end row, image, noise]: rows made from one image with one noise

        def to_device(values: np.ndarray) -> torch.Tensor:
            tensor = torch.from_numpy(values.copy())
            if self.device.type == "cuda":
                return tensor.pin_memory().to(self.device, non_blocking=True)
            return tensor

        def flush(rows: int) -> None:
            for first, end, image, noise in runs:
                noise.apply(x[image], batch[first:end])
            runs.clear()
            sink(batch[:rows], to_device(owner[:rows]), to_device(drawn[:rows]))
            self.forward_passes += rows
            bar.update(rows)

        rows = 0
        for image in range(len(images)):
            for key, ends in cuts.items():
                stage, noise = key[0], noises[key]
                slot = image * slots_per_image + first_slot[key]
                draw = 0
                for end in ends:
                    while draw < end:
                        block, offset = divmod(draw, DRAWS_PER_BLOCK)
                        take = min(end - draw, DRAWS_PER_BLOCK - offset, batch_size - rows)
                        if take == DRAWS_PER_BLOCK:  # a whole block: generate it in place
                            noise.fill(batch[rows:rows + take], seed, image_ids[image], stage, block)
                        else:
                            eps = noise.get(seed, image_ids[image], stage, block)[offset:offset + take]
                            batch[rows:rows + take].copy_(eps)
                        if runs and runs[-1][1] == rows and runs[-1][2] == image and runs[-1][3] is noise:
                            runs[-1][1] += take
                        else:
                            runs.append([rows, rows + take, image, noise])
                        owner[rows:rows + take] = slot
                        drawn[rows:rows + take] = np.arange(draw, draw + take)
                        rows += take
                        draw += take
                        if rows == batch_size:
                            flush(rows)
                            rows = 0
                    slot += 1
        if rows:
            flush(rows)
        bar.close()
