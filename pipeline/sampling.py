"""One sampling step through an engine, and its record: the counts, the passes run and the votes reused.

`Engine.session(votes)` opens a `Session` for one step of work (one counting pass, one sampling
certifier, the batch probe's one batch). Its calls turn requests ("n draws of stream s for every image")
into per-image class counts of the model's top-1 prediction (`count`), run sequential procedures with
continuous batching (`sequential`), or hand a head's outputs on the noisy copies to a sink (`outputs`).
Whatever they run is recorded on the session and nowhere else: `forward_passes` (noisy copies through the
model), `seconds`, `nonfinite` (per image id, noisy copies whose scores had NaN or inf: they never vote)
and `reused` (per (image id, stream), the prefix answered from the `VoteCache` it was given). A second
session starts from zero; only the cache, which the caller owns and passes in, carries votes between them.

Packing: (image, draw) work from all images and all requests fills batches of the engine's batch size;
each batch runs once under the engine's precision and adds its predictions into a count tensor on the
device with one `index_add_`, read back once per call (once per round for `sequential`). On a GPU the
noise is generated on the device into one preallocated batch buffer, the add of the image and the cast to
the model's input dtype and memory format are one pass, and the images go up through pinned host memory.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Generator, Mapping, Sequence

import numpy as np
import torch

from pipeline.noise import DRAWS_PER_BLOCK, make_noise
from pipeline.votes import Draws, Stream, Tally, VoteCache

__all__ = ["Session"]


class Session:
    """One step's sampling through `engine`, answering from and adding to `votes`, and the record of what
    it ran (`forward_passes`, `seconds`, `nonfinite`, `reused`). Read its record once, then drop it."""

    def __init__(self, engine, votes: VoteCache | None = None):
        self.engine = engine
        self.votes = VoteCache() if votes is None else votes
        self.forward_passes = 0
        self.seconds = 0.0
        self.nonfinite: Counter[str] = Counter()  # image id -> noisy outputs with NaN or inf
        self.reused: dict[tuple[str, Stream], int] = {}  # (image id, stream) -> the prefix answered from votes

    def shared_passes(self, image_id: str) -> int:
        """The image's draws this session answered from the votes instead of running them."""
        return sum(n for (reused_id, _), n in self.reused.items() if reused_id == image_id)

    def count(self, images: torch.Tensor, image_ids: Sequence[str], seed: int, requests: Sequence[Draws],
              head=None, batch_size: int | None = None) -> dict[Draws, np.ndarray]:
        """Class counts of the model's prediction on noisy copies of each image, one array [B, C] per request.

        Requests on one stream share their draws: n = 1,000 and n = 10,000 cost 10,000 forward passes, the
        smaller count the prefix of the larger. `head(inputs, image_index)`, when given, replaces the model's
        scores (for classifiers built around the model, such as patch ensembles); `batch_size` overrides
        the noisy copies per forward pass. Without a `head`, draws whose votes are in the cache are answered
        from them, and the votes at the cuts the cache wants are kept."""
        started = time.perf_counter()
        _check(images, image_ids)
        for draws in requests:
            if draws.n < 0:
                raise ValueError(f"a request needs n >= 0 draws, got {draws}")
        cuts: dict[Stream, list[int]] = {}  # each stream cut at every requested n into segments, one slot each
        for draws in requests:
            cuts.setdefault(draws.stream, []).append(draws.n)
        cuts = {stream: sorted(set(ns) - {0}) for stream, ns in cuts.items()}
        first_slot, slots_per_image = {}, 0
        for stream, ends in cuts.items():
            first_slot[stream] = slots_per_image
            slots_per_image += len(ends)
        votes = _SlotCounts(self.engine, images, head)
        votes.grow(torch.arange(len(images)).repeat_interleave(slots_per_image))
        if slots_per_image:
            packer = self._packer(images, image_ids, seed, votes.add, batch_size)
            for image in range(len(images)):
                for stream, ends in cuts.items():
                    slot, start = image * slots_per_image + first_slot[stream], 0
                    for end in ends:
                        known = start if head else self._answer(votes, slot, image_ids[image], stream, start, end)
                        if known < end:
                            packer.put(image, stream, known, end, slot)
                        slot, start = slot + 1, end
            packer.flush()
        self._record_nonfinite(image_ids, votes.nonfinite_per_image(len(images)))
        per_slot = votes.counts.view(len(images), slots_per_image, -1).cpu().numpy()
        if head is None:  # the model's own votes
            self.votes.keep_counted(image_ids, cuts, first_slot, per_slot)
        self.seconds += time.perf_counter() - started
        result = {}
        for draws in requests:
            used = cuts[draws.stream].index(draws.n) + 1 if draws.n else 0
            start = first_slot[draws.stream]
            result[draws] = per_slot[:, start:start + used].sum(axis=1)
        return result

    def sequential(self, images: torch.Tensor, image_ids: Sequence[str], seed: int,
                   procedures: Sequence[Generator], head=None, batch_size: int | None = None) -> list:
        """Runs one sampling procedure per image, with continuous batching; returns their results in order.

        A procedure is a generator that yields `Draws` (a request for the first n draws of that stream of
        its image), receives the class counts [C] of exactly those draws, and finally returns its result.
        It may only ask for more draws of a stream than it asked before. Each round packs the pending
        requests of every unfinished image into full batches; an image that stops leaves the next round's
        batches to the others. `head` and `batch_size` as in `count`. Without a `head`, a request whose
        counts are in the cache is answered from them, and sampling goes on after the last answered prefix.
        """
        started = time.perf_counter()
        _check(images, image_ids)
        if len(procedures) != len(images):
            raise ValueError(f"got {len(procedures)} procedures for {len(images)} images")
        slot_of: dict[tuple[int, Stream], int] = {}
        drawn: dict[tuple[int, Stream], int] = {}
        votes = _SlotCounts(self.engine, images, head)
        packer = self._packer(images, image_ids, seed, votes.add, batch_size)
        runs = _Procedures(procedures, image_ids, self.votes if head is None else VoteCache(), self.reused)
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
                    votes.counts[slot_of[key]] = torch.as_tensor(
                        runs.votes.prefixes(image_ids[key[0]], key[1])[drawn[key]])
            for image, draws in round_requests.items():
                key = (image, draws.stream)
                if draws.n < drawn[key]:
                    raise ValueError(f"image {image_ids[image]}: asked for {draws.n} draws of {draws.stream} after "
                                     f"{drawn[key]}; a procedure can only ask for more")
                packer.put(image, draws.stream, drawn[key], draws.n, slot_of[key])
                drawn[key] = draws.n
            packer.flush()
            slots = torch.as_tensor([slot_of[(image, draws.stream)] for image, draws in round_requests.items()],
                                    device=self.engine.device)
            counts = votes.counts[slots].cpu().numpy()  # the round's one read from the device
            for image, image_counts in zip(round_requests, counts, strict=True):
                runs.advance(image, image_counts, slot_of)
        self._record_nonfinite(image_ids, votes.nonfinite_per_image(len(images)))
        self.seconds += time.perf_counter() - started
        return runs.results

    def outputs(self, images: torch.Tensor, image_ids: Sequence[str], seed: int, draws: Draws, head,
                sink, votes: bool = False) -> None:
        """Runs `head` on the `draws.n` noisy copies of every image, batched like `count`; calls
        `sink(outputs, image_index, draw_index)` for each batch, the indices as device tensors. A draw the
        sound sampler rejected (`pipeline.noise.SoundGaussian`) counts as a non-finite output of its image.

        With `votes`, `head` returns (the model's logits, outputs) from one forward pass, and the model's
        top-1 votes on these draws are counted at the cuts the cache wants for this stream and kept in it,
        for `count` and `sequential` to answer the same requests without new passes."""
        started = time.perf_counter()
        _check(images, image_ids)
        device = self.engine.device
        nonfinite = torch.zeros(len(images), dtype=torch.int64, device=device)
        wanted = self.votes.wanted.get(draws.stream)
        cuts = sorted({cut for cut in wanted if cut <= draws.n} | {draws.n}) if votes and wanted else []
        tally = Tally(cuts, len(images), device)

        _refuse_head(self.engine, head)

        def forward(inputs: torch.Tensor, slots: torch.Tensor, draw_index: torch.Tensor, _sigma,
                    rejected: torch.Tensor | None) -> None:
            outputs = self.engine.forward(head, inputs)
            if votes:
                logits, outputs = outputs
                tally.add(logits, slots, draw_index, rejected)
            # an output needed for every draw: a draw the sampler rejected leaves its image without a certificate
            bad = ~torch.isfinite(outputs.flatten(1)).all(dim=1)
            nonfinite.index_add_(0, slots, (bad if rejected is None else bad | rejected).long())
            sink(outputs, slots, draw_index)

        if draws.n:
            packer = self._packer(images, image_ids, seed, forward, None)
            for image in range(len(images)):
                packer.put(image, draws.stream, 0, draws.n, image)
            packer.flush()
        self._record_nonfinite(image_ids, nonfinite)
        for image_id, prefixes in tally.known(image_ids).items():
            self.votes.keep(image_id, draws.stream, prefixes)
        self.seconds += time.perf_counter() - started

    def _answer(self, votes: _SlotCounts, slot: int, image_id: str, stream: Stream, start: int, end: int) -> int:
        """Fills `slot` with the cached counts of draws [start, p) of the stream, p the largest known prefix
        <= end; returns p, or `start` when nothing is known."""
        known, counts = self.votes.answer(image_id, stream, start, end)
        if counts is not None:
            votes.counts[slot] = torch.as_tensor(counts)
            self.reused[(image_id, stream)] = known
        return known

    def _record_nonfinite(self, image_ids: Sequence[str], per_image: torch.Tensor) -> None:
        """Adds each image's count of non-finite outputs to `nonfinite` (one read from the device)."""
        for image, count in enumerate(per_image.tolist()):
            if count:
                self.nonfinite[image_ids[image]] += int(count)

    def _packer(self, images, image_ids, seed, sink, batch_size) -> _Packer:
        if self.engine.device.type == "cuda":
            x = images.to(torch.float32).pin_memory().to(self.engine.device, non_blocking=True)
        else:
            x = images.to(self.engine.device, torch.float32)
        rows = batch_size or self.engine.resolve_batch_size(images.shape[1:])
        return _Packer(self, x, image_ids, seed, sink, rows)


def _check(images: torch.Tensor, image_ids: Sequence[str]) -> None:
    if images.ndim != 4:
        raise ValueError(f"images must have shape [B, C, H, W], got {tuple(images.shape)}")
    if len(image_ids) != len(images):
        raise ValueError(f"got {len(image_ids)} image ids for {len(images)} images")


class _Procedures:
    """The sampling procedures of `Session.sequential`: their pending requests, their results, and the
    requests answered from cached votes (the prefix answered per (image, stream), also written to `reused`
    by image id)."""

    def __init__(self, procedures: Sequence[Generator], image_ids: Sequence[str], votes: VoteCache, reused: dict):
        self.procedures, self.image_ids, self.votes, self.reused = procedures, image_ids, votes, reused
        self.results: list = [None] * len(procedures)
        self.pending: dict[int, Draws] = {}
        self.answered: dict[tuple[int, Stream], int] = {}

    def advance(self, image: int, counts, sampled: Mapping) -> None:
        """Sends `counts` to the image's procedure and takes its next request: answered at once while its
        counts are known and its stream has not been sampled (in `sampled`), else pending."""
        while True:
            try:
                request = self.procedures[image].send(counts)
            except StopIteration as stop:
                self.results[image] = stop.value
                return
            if not isinstance(request, Draws) or request.n < 1:
                raise ValueError(f"a procedure must yield Draws with n >= 1, got {request!r}")
            key, before = (image, request.stream), self.answered.get((image, request.stream), 0)
            counts = None if key in sampled else self.votes.prefixes(self.image_ids[image], request.stream).get(
                request.n)
            if counts is None or request.n < before:
                break
            self.reused[(self.image_ids[image], request.stream)] = self.answered[key] = request.n
        self.pending[image] = request


def _refuse_head(engine, head) -> None:
    """A head runs the model on noisy inputs without their noise levels, which a noise-conditioned model
    (a diffusion denoiser in front of a classifier) needs: refused rather than denoised as if clean."""
    if head is not None and engine.noise_conditioned:
        raise ValueError("this certifier runs its own head on the noisy inputs, which does not pass their noise "
                         "level to a noise-conditioned model (a diffusion denoiser); certify it with cohen, topk, "
                         "ssn or dssn")


class _SlotCounts:
    """Per-slot class counts of the top-1 prediction, on the device; one `index_add_` per batch. Each slot
    belongs to one image (`image_of`), whose index a `head` receives with its inputs."""

    def __init__(self, engine, images, head):
        self.engine, self.head = engine, head
        _refuse_head(engine, head)
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

    def add(self, inputs: torch.Tensor, slots: torch.Tensor, draws: torch.Tensor, sigma: torch.Tensor | None,
            rejected: torch.Tensor | None) -> None:
        if self.head is None:
            scores = self.engine.logits(inputs, sigma)
        else:
            scores = self.engine.forward(lambda x: self.head(x, self.image_of[slots]), inputs)
        finite = torch.isfinite(scores).all(dim=1)  # a draw with a NaN or infinite score does not vote
        if rejected is not None:  # a draw the sampler rejected votes for no class, and is no model fault
            finite, faulty = finite & ~rejected, ~finite & ~rejected
        else:
            faulty = ~finite
        self.counts.view(-1).index_add_(0, slots * self.num_classes + scores.argmax(dim=1), finite.long())
        self.nonfinite.index_add_(0, slots, faulty.long())

    def nonfinite_per_image(self, images: int) -> torch.Tensor:
        """Non-finite draws per image, summed over its slots."""
        return torch.zeros(images, dtype=torch.int64, device=self.counts.device).index_add_(0, self.image_of,
                                                                                          self.nonfinite)


class _Packer:
    """Fills one preallocated batch with noisy draws of many images and hands each full batch to
    `sink(inputs, slots, draw_index, sigma, rejected)` (sigma: each row's noise level, for a noise-conditioned
    model, else None; rejected: a mask of the draws the sound sampler rejected, when the batch holds draws of
    a noise that can reject, else None), counting the rows in the session's `forward_passes`.

    Whole blocks of draws are generated in place in the batch; the image is added (and the result cast to
    the model's input dtype and memory format) once per run of rows of one image, just before the forward.
    """

    def __init__(self, session: Session, x: torch.Tensor, image_ids, seed: int, sink: Callable, batch_size: int):
        self.session, self.x, self.image_ids, self.seed, self.sink = session, x, image_ids, seed, sink
        self.device, self.batch_size = session.engine.device, batch_size
        shape = (batch_size, *x.shape[1:])
        self.batch = torch.empty(shape, device=self.device)
        dtype, layout = session.engine.input_format()
        same = dtype == torch.float32 and layout == torch.contiguous_format
        self.inputs = self.batch if same else torch.empty(shape, dtype=dtype, device=self.device,
                                                          memory_format=layout)
        self.owner = np.empty(batch_size, dtype=np.int64)
        self.drawn = np.empty(batch_size, dtype=np.int64)
        self.sigma = np.empty(batch_size, dtype=np.float32) if session.engine.noise_conditioned else None
        self.noises: dict[Stream, object] = {}
        self.runs: list[list] = []  # [first row, end row, image, noise]: rows made from one image with one noise
        self.rows = 0

    def put(self, image: int, stream: Stream, start: int, end: int, slot: int) -> None:
        """Adds draws [start, end) of `stream` of `image`, counted in `slot`; hands over every batch that
        fills up."""
        if stream not in self.noises:
            self.noises[stream] = make_noise(stream.noise, self.x.shape[1:], self.device, stream.sigma,
                                             stream.options)
        noise = self.noises[stream]
        draw = start
        while draw < end:
            block, offset = divmod(draw, DRAWS_PER_BLOCK)
            rows = self.rows
            take = min(end - draw, DRAWS_PER_BLOCK - offset, self.batch_size - rows)
            if take == DRAWS_PER_BLOCK:  # a whole block: generate it in place
                noise.fill(self.batch[rows:rows + take], self.seed, self.image_ids[image], stream.stage, block)
            else:
                eps = noise.get(self.seed, self.image_ids[image], stream.stage, block)[offset:offset + take]
                self.batch[rows:rows + take].copy_(eps)
            last = self.runs[-1] if self.runs else None
            if last is not None and last[1] == rows and last[2] == image and last[3] is noise:
                last[1] += take
            else:
                self.runs.append([rows, rows + take, image, noise])
            self.owner[rows:rows + take] = slot
            self.drawn[rows:rows + take] = np.arange(draw, draw + take)
            if self.sigma is not None:
                self.sigma[rows:rows + take] = stream.sigma
            self.rows += take
            draw += take
            if self.rows == self.batch_size:
                self.flush()

    def flush(self) -> None:
        """Hands the rows filled so far to the sink."""
        rows = self.rows
        if not rows:
            return
        rejected = None
        for first, end, image, noise in self.runs:
            if noise.can_reject:  # a rejected draw's raw row is all NaN
                if rejected is None:
                    rejected = torch.zeros(rows, dtype=torch.bool, device=self.device)
                rejected[first:end] = torch.isnan(self.batch[first:end].flatten(1)[:, 0])
            out = None if self.inputs is self.batch else self.inputs[first:end]
            noise.apply(self.x[image], self.batch[first:end], out)
        self.runs.clear()
        owner, drawn = self._to_device(self.owner[:rows]), self._to_device(self.drawn[:rows])
        sigma = None if self.sigma is None else self._to_device(self.sigma[:rows])
        self.sink(self.inputs[:rows], owner, drawn, sigma, rejected)
        self.session.forward_passes += rows
        self.rows = 0

    def _to_device(self, values: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(values.copy())
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor
