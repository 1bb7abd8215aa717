"""The batched smoothing core: noisy copies of many images through one model, counted on the device.

The engine turns requests ("n draws of stage s at scale sigma for every image") into per-image class
counts of the model's top-1 prediction. It packs (image, draw) work from all images and all requests
into full batches of `batch_size`, runs the model once per batch under `torch.inference_mode()`, and
adds each batch's predictions into a count tensor on the device with one `index_add_`: no Python loop
over predictions and no host synchronisation until the counts are read at the end.

Requests that share (stage, sigma, noise) share their draws: draw i of a stream is the same tensor for every
request (see `pipeline.noise`), so n = 1,000 and n = 10,000 on one stream cost 10,000 forward passes,
and the smaller count is the prefix of the larger. The engine knows nothing of certificates or Ray.

`Engine.sequential` serves procedures that decide as they go (sequential tests): each image asks for more
draws, looks at its counts, and asks again or stops. Continuous batching: every round packs the pending
requests of all unfinished images into full batches, so batches stay full while images stop at different
times, and the counts are read once per round. A draw is a pure function of (seed, image id, stage,
index), so the results do not depend on which images shared a batch.

The fast path on a GPU: the noise is generated on the device into one preallocated batch buffer, the add
of the image and the cast to the model's input dtype (and memory format) are one pass, and the images go
up through pinned host memory. `precision="bf16"`, `channels_last` and `compile` are recorded with every
certificate (`Engine.settings`).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import Counter
from collections.abc import Callable, Generator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.batch_probe import probe_batch_size
from pipeline.noise import DRAWS_PER_BLOCK, make_noise

AUTO = "auto"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}

log = logging.getLogger(__name__)
_PROBES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {engine settings: its probe}

__all__ = ["AUTO", "PRECISIONS", "Draws", "Engine"]


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

    `precision="bf16"` rounds each noisy input to bf16 (x + sigma * eps is computed in fp32 first) and runs
    the model under bf16 autocast: the counts are exact samples of that reduced-precision classifier, so
    certificates hold for it, not for its fp32 original. `channels_last` stores the model and its inputs
    in NHWC; `compile` runs the model through `torch.compile` (True, or the name of a backend). Neither
    changes what is certified beyond the floating-point rounding of the model they run.
    """

    def __init__(self, model: torch.nn.Module, *, device: str | torch.device = "cpu", batch_size: int | str = AUTO,
                 precision: str = "fp32", progress: bool = False, channels_last: bool = False,
                 compile: bool | str = False):
        if batch_size != AUTO and not (isinstance(batch_size, int) and not isinstance(batch_size, bool)
                                       and batch_size >= 1):
            raise ValueError(f"batch_size must be 'auto' or an integer >= 1, got {batch_size!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        if not isinstance(compile, bool | str):
            raise ValueError(f"compile must be true, false or the name of a torch.compile backend, got {compile!r}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._runner = self.model
        if compile:
            self._runner = torch.compile(self.model, **({} if compile is True else {"backend": compile}))
        self.batch_size: int | str = batch_size  # "auto" until the first images arrive (`resolve_batch_size`)
        self.probe: dict | None = None
        self.precision = precision
        self.channels_last = bool(channels_last)
        self.compile = compile
        self.progress = progress
        self.forward_passes = 0
        self.seconds = 0.0
        self.nonfinite: Counter[str] = Counter()  # image id -> noisy outputs with NaN or inf (they never vote)
        self.wanted: dict[tuple, list[int]] = {}  # stream -> the draw counts whose votes to keep (`reusing`)
        self.known: dict[tuple, dict] = {}  # (image id, stream) -> {n: vote counts of draws [0, n)}
        self.reused: dict[tuple, int] = {}  # (image id, stream) -> the prefix answered from `known`
        self._num_classes: int | None = None

    def settings(self) -> dict:
        """What the model ran as, for the certificate's record: precision, layout, compilation and the batch
        size (with the probe's figures when `auto` chose it)."""
        chosen_by = "probe" if self.probe else "config" if self.batch_size != AUTO else "not yet probed"
        batch = {"size": self.batch_size, "chosen_by": chosen_by}
        if self.probe:
            batch["probe"] = {key: value for key, value in self.probe.items() if key != "size"}
        return {"precision": self.precision, "channels_last": self.channels_last, "compile": self.compile,
                "batch": batch}

    def resolve_batch_size(self, input_shape: Sequence[int]) -> int:
        """The rows per forward pass: the configured number, or with `batch_size="auto"` the fastest size
        of a short timed probe on noisy inputs of `input_shape` (`pipeline.batch_probe`), run once per model,
        input shape, device, precision, layout, compilation and thread count in a process."""
        if self.batch_size == AUTO:
            key = (tuple(input_shape), str(self.device), self.precision, self.channels_last, str(self.compile),
                   torch.get_num_threads())
            probes = _PROBES.setdefault(self.model, {})
            if key not in probes:
                probes[key] = probe_batch_size(self._probe_step(tuple(input_shape)), self.device)
            self.probe = probes[key]
            self.batch_size = self.probe["size"]
            log.info("batch_size auto: %d rows per forward pass (%s draws/s by size, %.1f s)", self.batch_size,
                     self.probe["draws_per_s"], self.probe["seconds"])
        return self.batch_size

    def _probe_step(self, shape: tuple) -> Callable[[int], None]:
        """One batch of the engine's own work at `rows` rows (seeded noise, the add and cast, the forward, the
        count on the device): `count` on one grey image, leaving the engine's counters as they were."""
        image = torch.full((1, *shape), 0.5)

        def step(rows: int) -> None:
            passes, seconds = self.forward_passes, self.seconds
            self.count(image, ["batch probe"], 0, [Draws("batch probe", 0.25, rows)], batch_size=rows)
            self.forward_passes, self.seconds = passes, seconds
            self.nonfinite.pop("batch probe", None)

        return step

    def forward(self, function, inputs: torch.Tensor) -> torch.Tensor:
        """`function(inputs)` under inference mode and the configured precision."""
        dtype = PRECISIONS[self.precision]
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=dtype or torch.float32,
                                                    enabled=dtype is not None):
            return function(inputs)

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """The model's output on a batch, under inference mode and the configured precision."""
        return self.forward(self._runner, inputs)

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
        Without a `head`, draws whose votes are in `known` are answered from them (see `reusing`).
        """
        started = time.perf_counter()
        self._check(images, image_ids)
        for draws in requests:
            if draws.n < 0:
                raise ValueError(f"a request needs n >= 0 draws, got {draws}")
        # One stream per (stage, sigma, noise); each is cut at every requested n into segments, one count slot each.
        cuts: dict[tuple, list[int]] = {}
        for draws in requests:
            cuts.setdefault(draws.stream, []).append(draws.n)
        cuts = {key: sorted(set(ns) - {0}) for key, ns in cuts.items()}
        first_slot, slots_per_image = {}, 0
        for key, ends in cuts.items():
            first_slot[key] = slots_per_image
            slots_per_image += len(ends)

        votes = _Votes(self, images, head)
        votes.grow(torch.arange(len(images)).repeat_interleave(slots_per_image))
        if slots_per_image:
            packer = self._packer(images, image_ids, seed, votes.add, batch_size,
                                  len(images) * sum(ends[-1] for ends in cuts.values()))
            for image in range(len(images)):
                for key, ends in cuts.items():
                    slot, start = image * slots_per_image + first_slot[key], 0
                    for end in ends:
                        known = start if head else self._answer(votes, slot, image_ids[image], key, start, end)
                        if known < end:
                            packer.put(image, key, known, end, slot)
                        slot, start = slot + 1, end
            packer.close()
        self._record_nonfinite(image_ids, votes.nonfinite_per_image(len(images)))
        per_slot = votes.counts.view(len(images), slots_per_image, -1).cpu().numpy()
        if head is None:  # the model's own votes
            self._keep(image_ids, cuts, first_slot, per_slot)
        self.seconds += time.perf_counter() - started

        result = {}
        for draws in requests:
            key = draws.stream
            used = cuts[key].index(draws.n) + 1 if draws.n else 0
            start = first_slot[key]
            result[draws] = per_slot[:, start:start + used].sum(axis=1)
        return result

    @contextmanager
    def reusing(self, wanted: dict[tuple, list[int]]):
        """Within the block, keeps the counts of the model's top-1 votes on draws [0, n) of a stream at every
        n in `wanted[stream]` as `count` (or `outputs` with `votes`) finds them, in `known`
        {(image id, stream): {n: counts [C]}}; `count` and `sequential` answer requests from them. `reused`
        says, per (image id, stream), the prefix answered that way. A draw is a pure function of (seed, image
        id, stream, index), so the counts are those a fresh pass would find."""
        self.wanted, self.known = wanted, {}
        self.reused.clear()
        try:
            yield self
        finally:
            self.wanted, self.known = {}, {}

    def sequential(self, images: torch.Tensor, image_ids: Sequence[str], seed: int,
                   procedures: Sequence[Generator], head=None, batch_size: int | None = None) -> list:
        """Runs one sampling procedure per image, with continuous batching; returns their results in order.

        A procedure is a generator that yields `Draws` (a request for the first n draws of that stream of
        its image), receives the class counts [C] of exactly those draws, and finally returns its result.
        It may only ask for more draws of a stream than it asked before. Each round packs the pending
        requests of every unfinished image into full batches; an image that stops leaves the next round's
        batches to the others. `head` and `batch_size` as in `count`.

        Without a `head`, a request whose counts are in `known` (the model's votes on the same draws, which
        `count` or `outputs` found earlier: see `reusing`) is answered from them, and sampling goes on after
        the last answered prefix.
        """
        started = time.perf_counter()
        self._check(images, image_ids)
        if len(procedures) != len(images):
            raise ValueError(f"got {len(procedures)} procedures for {len(images)} images")
        slot_of: dict[tuple[int, tuple], int] = {}
        drawn: dict[tuple[int, tuple], int] = {}
        votes = _Votes(self, images, head)
        packer = self._packer(images, image_ids, seed, votes.add, batch_size, None)
        runs = _Procedures(procedures, image_ids, self.known if head is None else {}, self.reused, packer.bar)
        for image in range(len(images)):
            runs.advance(image, None, slot_of)
        while runs.pending:
            round_requests, runs.pending = runs.pending, {}
            new_slots = [(image, draws.stream) for image, draws in round_requests.items()
                         if (image, draws.stream) not in slot_of]
            votes.grow([image for image, _ in new_slots])
            for key in new_slots:
                slot_of[key] = len(slot_of)
                drawn[key] = runs.answered.get(key, 0)
                if drawn[key]:  # go on from the answered prefix
                    votes.counts[slot_of[key]] = torch.as_tensor(runs.known[(image_ids[key[0]], key[1])][drawn[key]])
            for image, draws in round_requests.items():
                key = (image, draws.stream)
                if draws.n < drawn[key]:
                    raise ValueError(f"image {image_ids[image]}: asked for {draws.n} draws of {draws.stream} after "
                                     f"{drawn[key]}; a procedure can only ask for more")
                packer.put(image, draws.stream, drawn[key], draws.n, slot_of[key])
                drawn[key] = draws.n
            packer.flush()
            slots = torch.as_tensor([slot_of[(image, draws.stream)] for image, draws in round_requests.items()],
                                    device=self.device)
            counts = votes.counts[slots].cpu().numpy()  # the round's one read from the device
            for image, image_counts in zip(round_requests, counts, strict=True):
                runs.advance(image, image_counts, slot_of)
        results = runs.results
        packer.close()
        self._record_nonfinite(image_ids, votes.nonfinite_per_image(len(images)))
        self.seconds += time.perf_counter() - started
        return results

    def outputs(self, images: torch.Tensor, image_ids: Sequence[str], seed: int, draws: Draws, head,
                sink, votes: bool = False) -> None:
        """Runs `head` on the `draws.n` noisy copies of every image, batched like `count`; calls
        `sink(outputs, image_index, draw_index)` for each batch, the indices as device tensors.

        With `votes`, `head` returns (the model's logits, outputs) from one forward pass, and the model's
        top-1 votes on these draws are counted at the cuts in `wanted` for this stream (see `reusing`) and
        kept in `known`, for `count` and `sequential` to answer the same requests without new passes."""
        started = time.perf_counter()
        self._check(images, image_ids)
        nonfinite = torch.zeros(len(images), dtype=torch.int64, device=self.device)
        wanted = self.wanted.get(draws.stream)
        cuts = sorted({cut for cut in wanted if cut <= draws.n} | {draws.n}) if votes and wanted else []
        tally = _Tally(cuts, len(images), self.device)

        def forward(inputs: torch.Tensor, slots: torch.Tensor, draw_index: torch.Tensor) -> None:
            outputs = self.forward(head, inputs)
            if votes:
                logits, outputs = outputs
                tally.add(logits, slots, draw_index)
            nonfinite.index_add_(0, slots, (~torch.isfinite(outputs.flatten(1)).all(dim=1)).long())
            sink(outputs, slots, draw_index)

        if draws.n:
            packer = self._packer(images, image_ids, seed, forward, None, len(images) * draws.n)
            for image in range(len(images)):
                packer.put(image, draws.stream, 0, draws.n, image)
            packer.close()
        self._record_nonfinite(image_ids, nonfinite)
        for image_id, prefixes in tally.known(image_ids).items():
            self.known.setdefault((image_id, draws.stream), {}).update(prefixes)
        self.seconds += time.perf_counter() - started

    def _answer(self, votes: _Votes, slot: int, image_id: str, key: tuple, start: int, end: int) -> int:
        """Fills `slot` with the known counts of draws [start, p) of the stream, p the largest known prefix
        <= end (when the counts at `start` are known too); returns p, or `start` when nothing is known."""
        prefixes = self.known.get((image_id, key), {})
        first = prefixes.get(start) if start else 0
        known = max((n for n in prefixes if start < n <= end), default=None)
        if known is None or first is None:
            return start
        votes.counts[slot] = torch.as_tensor(prefixes[known] - first)
        self.reused[(image_id, key)] = known
        return known

    def _keep(self, image_ids: Sequence[str], cuts: dict[tuple, list[int]], first_slot: dict[tuple, int],
              per_slot: np.ndarray) -> None:
        """Keeps the counts of the draws [0, n) that `count` found at every n that `wanted` asks for."""
        for key, ends in cuts.items():
            keep = set(self.wanted.get(key, ()))
            if not keep:
                continue
            start = first_slot[key]
            cumulative = per_slot[:, start:start + len(ends)].cumsum(axis=1)
            for image, image_id in enumerate(image_ids):
                self.known.setdefault((image_id, key), {}).update(
                    {end: cumulative[image, j] for j, end in enumerate(ends) if end in keep})

    def _record_nonfinite(self, image_ids: Sequence[str], per_image: torch.Tensor) -> None:
        """Adds each image's count of non-finite outputs to `nonfinite` (one read from the device)."""
        for image, count in enumerate(per_image.tolist()):
            if count:
                self.nonfinite[image_ids[image]] += int(count)

    @staticmethod
    def _check(images: torch.Tensor, image_ids: Sequence[str]) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must have shape [B, C, H, W], got {tuple(images.shape)}")
        if len(image_ids) != len(images):
            raise ValueError(f"got {len(image_ids)} image ids for {len(images)} images")

    def _packer(self, images, image_ids, seed, sink, batch_size, total) -> _Packer:
        if self.device.type == "cuda":
            x = images.to(torch.float32).pin_memory().to(self.device, non_blocking=True)
        else:
            x = images.to(self.device, torch.float32)
        counting_draws = total is not None
        bar = tqdm(total=total if counting_draws else len(images), desc="noise draws" if counting_draws else "images",
                   unit="draw" if counting_draws else "image", unit_scale=counting_draws, mininterval=2.0,
                   disable=not self.progress)
        rows = batch_size or self.resolve_batch_size(images.shape[1:])
        return _Packer(self, x, image_ids, seed, sink, rows, bar, counting_draws)


class _Procedures:
    """The sampling procedures of `Engine.sequential`: their pending requests, their results, and the
    requests answered from `known` counts (the prefix answered per (image, stream))."""

    def __init__(self, procedures: Sequence[Generator], image_ids: Sequence[str], known: dict, reused: dict, bar):
        self.procedures, self.image_ids, self.known, self.reused, self.bar = procedures, image_ids, known, reused, bar
        self.results: list = [None] * len(procedures)
        self.pending: dict[int, Draws] = {}
        self.answered: dict[tuple[int, tuple], int] = {}

    def advance(self, image: int, counts, sampled: Mapping) -> None:
        """Sends `counts` to the image's procedure and takes its next request: answered at once while its
        counts are known and its stream has not been sampled (in `sampled`), else pending."""
        while True:
            try:
                request = self.procedures[image].send(counts)
            except StopIteration as stop:
                self.results[image] = stop.value
                self.bar.update(1)
                return
            if not isinstance(request, Draws) or request.n < 1:
                raise ValueError(f"a procedure must yield Draws with n >= 1, got {request!r}")
            key, before = (image, request.stream), self.answered.get((image, request.stream), 0)
            counts = None if key in sampled else self.known.get((self.image_ids[image], request.stream), {}).get(
                request.n)
            if counts is None or request.n < before:
                break
            self.reused[(self.image_ids[image], request.stream)] = self.answered[key] = request.n
        self.pending[image] = request


class _Tally:
    """Top-1 vote counts of each image at given cuts of one stream (draws [0, cut) for each cut)."""

    def __init__(self, cuts: list[int], images: int, device: torch.device):
        self.cuts, self.images, self.device = cuts, images, device
        self.bounds = torch.as_tensor(cuts, dtype=torch.long, device=device)
        self.counts: torch.Tensor | None = None  # [images, cuts, classes]: votes of draws in [cut j-1, cut j)

    def add(self, logits: torch.Tensor, images: torch.Tensor, draws: torch.Tensor) -> None:
        if not self.cuts:
            return
        classes = logits.shape[1]
        if self.counts is None:
            self.counts = torch.zeros((self.images, len(self.cuts), classes), dtype=torch.int64, device=self.device)
        segment = torch.searchsorted(self.bounds, draws, right=True)  # cuts <= draw: the draw counts beyond them
        counted = torch.isfinite(logits).all(dim=1) & (segment < len(self.cuts))  # NaN or inf scores never vote
        flat = (images * len(self.cuts) + segment.clamp(max=len(self.cuts) - 1)) * classes + logits.argmax(dim=1)
        self.counts.view(-1).index_add_(0, flat, counted.long())

    def known(self, image_ids: Sequence[str]) -> dict[str, dict[int, np.ndarray]]:
        """{image id: {cut: vote counts of draws [0, cut)}}."""
        if self.counts is None:
            return {}
        cumulative = self.counts.cumsum(dim=1).cpu().numpy()
        return {image_id: {cut: cumulative[image, j] for j, cut in enumerate(self.cuts)}
                for image, image_id in enumerate(image_ids)}


class _Votes:
    """Per-slot class counts of the top-1 prediction, on the device; one `index_add_` per batch. Each slot
    belongs to one image (`image_of`), whose index a `head` receives with its inputs."""

    def __init__(self, engine: Engine, images, head):
        self.engine, self.head = engine, head
        if head is None:
            self.num_classes = engine.num_classes(images[0])
        else:
            probe = images[:1].to(engine.device, torch.float32)
            self.num_classes = int(engine.forward(
                lambda x: head(x, torch.zeros(1, dtype=torch.long, device=engine.device)), probe).shape[1])
        self.counts = torch.zeros((0, self.num_classes), dtype=torch.int64, device=engine.device)
        self.nonfinite = torch.zeros(0, dtype=torch.int64, device=engine.device)  # per slot
        self.image_of = torch.zeros(0, dtype=torch.long, device=engine.device)

    def grow(self, images) -> None:
        """New slots, one for each image listed, after the existing ones."""
        device = self.counts.device
        self.counts = torch.cat([self.counts, torch.zeros((len(images), self.num_classes), dtype=torch.int64,
                                                          device=device)])
        self.nonfinite = torch.cat([self.nonfinite, torch.zeros(len(images), dtype=torch.int64, device=device)])
        self.image_of = torch.cat([self.image_of, torch.as_tensor(images, dtype=torch.long, device=device)])

    def add(self, inputs: torch.Tensor, slots: torch.Tensor, draws: torch.Tensor) -> None:
        if self.head is None:
            scores = self.engine.logits(inputs)
        else:
            scores = self.engine.forward(lambda x: self.head(x, self.image_of[slots]), inputs)
        finite = torch.isfinite(scores).all(dim=1)  # a draw with a NaN or infinite score does not vote
        self.counts.view(-1).index_add_(0, slots * self.num_classes + scores.argmax(dim=1), finite.long())
        self.nonfinite.index_add_(0, slots, (~finite).long())

    def nonfinite_per_image(self, images: int) -> torch.Tensor:
        """Non-finite draws per image, summed over its slots."""
        return torch.zeros(images, dtype=torch.int64, device=self.counts.device).index_add_(0, self.image_of,
                                                                                          self.nonfinite)


class _Packer:
    """Fills one preallocated batch with noisy draws of many images and hands each full batch to
    `sink(inputs, slots, draw_index)`.

    Whole blocks of draws are generated in place in the batch; the image is added (and the result cast to
    the model's input dtype and memory format) once per run of rows of one image, just before the forward.
    """

    def __init__(self, engine: Engine, x: torch.Tensor, image_ids, seed: int, sink, batch_size: int, bar,
                 count_draws: bool):
        self.engine, self.x, self.image_ids, self.seed, self.sink = engine, x, image_ids, seed, sink
        self.batch_size, self.bar, self.count_draws = batch_size, bar, count_draws
        shape = (batch_size, *x.shape[1:])
        self.batch = torch.empty(shape, device=engine.device)
        dtype = PRECISIONS[engine.precision] or torch.float32
        layout = torch.channels_last if engine.channels_last else torch.contiguous_format
        same = dtype == torch.float32 and layout == torch.contiguous_format
        self.inputs = self.batch if same else torch.empty(shape, dtype=dtype, device=engine.device,
                                                          memory_format=layout)
        self.owner = np.empty(batch_size, dtype=np.int64)
        self.drawn = np.empty(batch_size, dtype=np.int64)
        self.noises: dict[tuple, object] = {}
        self.runs: list[list] = []  # [first row, end row, image, noise]: rows made from one image with one noise
        self.rows = 0

    def put(self, image: int, key: tuple, start: int, end: int, slot: int) -> None:
        """Adds draws [start, end) of stream `key` (stage, sigma, noise, options) of `image`, counted in
        `slot`; hands over every batch that fills up."""
        stage = key[0]
        if key not in self.noises:
            self.noises[key] = make_noise(key[2], self.x.shape[1:], self.engine.device, key[1], key[3])
        noise = self.noises[key]
        draw = start
        while draw < end:
            block, offset = divmod(draw, DRAWS_PER_BLOCK)
            rows = self.rows
            take = min(end - draw, DRAWS_PER_BLOCK - offset, self.batch_size - rows)
            if take == DRAWS_PER_BLOCK:  # a whole block: generate it in place
                noise.fill(self.batch[rows:rows + take], self.seed, self.image_ids[image], stage, block)
            else:
                eps = noise.get(self.seed, self.image_ids[image], stage, block)[offset:offset + take]
                self.batch[rows:rows + take].copy_(eps)
            last = self.runs[-1] if self.runs else None
            if last is not None and last[1] == rows and last[2] == image and last[3] is noise:
                last[1] += take
            else:
                self.runs.append([rows, rows + take, image, noise])
            self.owner[rows:rows + take] = slot
            self.drawn[rows:rows + take] = np.arange(draw, draw + take)
            self.rows += take
            draw += take
            if self.rows == self.batch_size:
                self.flush()

    def flush(self) -> None:
        """Hands the rows filled so far to the sink."""
        rows = self.rows
        if not rows:
            return
        for first, end, image, noise in self.runs:
            out = None if self.inputs is self.batch else self.inputs[first:end]
            noise.apply(self.x[image], self.batch[first:end], out)
        self.runs.clear()
        self.sink(self.inputs[:rows], self._to_device(self.owner[:rows]), self._to_device(self.drawn[:rows]))
        self.engine.forward_passes += rows
        if self.count_draws:
            self.bar.update(rows)
        self.rows = 0

    def close(self) -> None:
        self.flush()
        self.bar.close()

    def _to_device(self, values: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(values.copy())
        if self.engine.device.type == "cuda":
            return tensor.pin_memory().to(self.engine.device, non_blocking=True)
        return tensor
