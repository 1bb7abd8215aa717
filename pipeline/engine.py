"""The batched smoothing core: a classifier on a device, ready to count its top-1 votes on noisy copies.

The engine holds what belongs to the model: the model on its device, the precision and memory layout it
runs in, its compiled runner, the rows per forward pass (configured, or chosen once by a timed probe) and
its class count. It keeps no record of the work it does: each step of sampling runs in a `Session`
(`engine.session(votes)`, `pipeline.sampling`), which packs (image, draw) work into full batches, counts the
votes on the device, and records the passes it ran, the votes it reused from the batch's `VoteCache`
(`pipeline.votes`) and the non-finite outputs it met. The engine knows nothing of certificates or Ray.

A draw is a pure function of (seed, image id, stage, index) (see `pipeline.noise`), so the counts do not
depend on the batch size or on which images shared a batch. `precision="bf16"`, `channels_last` and
`compile` are recorded with every certificate (`Engine.settings`).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence

import torch

from pipeline.batch_probe import probe_batch_size
from pipeline.sampling import Session
from pipeline.votes import Draws, VoteCache

AUTO = "auto"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}

log = logging.getLogger(__name__)
_PROBES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {engine settings: its probe}

__all__ = ["AUTO", "PRECISIONS", "Draws", "Engine"]


class Engine:
    """A classifier ready to run on noisy copies of images, whose top-1 predictions its sessions count.

    `precision="bf16"` rounds each noisy input to bf16 (x + sigma * eps is computed in fp32 first) and runs
    the model under bf16 autocast: the counts are exact samples of that reduced-precision classifier, so
    certificates hold for it, not for its fp32 original. `channels_last` stores the model and its inputs
    in NHWC; `compile` runs the model through `torch.compile` (True, or the name of a backend). Neither
    changes what is certified beyond the floating-point rounding of the model they run.
    """

    def __init__(self, model: torch.nn.Module, *, device: str | torch.device = "cpu", batch_size: int | str = AUTO,
                 precision: str = "fp32", channels_last: bool = False, compile: bool | str = False):
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
        count on the device): `count` on one grey image, in a session of its own that nobody reads."""
        image = torch.full((1, *shape), 0.5)

        def step(rows: int) -> None:
            self.session().count(image, ["batch probe"], 0, [Draws("batch probe", 0.25, rows)], batch_size=rows)

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

    def session(self, votes: VoteCache | None = None) -> Session:
        """A fresh record for one step of sampling (`pipeline.sampling.Session`), answering from and adding
        to `votes` (the model's votes kept for one batch; none by default)."""
        return Session(self, votes)

    def input_format(self) -> tuple[torch.dtype, torch.memory_format]:
        """The dtype and memory format of the model's noisy inputs."""
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        return PRECISIONS[self.precision] or torch.float32, layout
