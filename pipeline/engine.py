"""The batched smoothing core: a classifier on a device, ready to count its top-1 votes on noisy copies.

The engine holds what belongs to the model: the model on its device, the precision and memory layout it
runs in, its compiled runner, the rows per forward pass (configured, or chosen once by a timed probe) and
its class count. It keeps no record of the work it does: each step of sampling runs in a `Session`
(`engine.session(votes)`, `pipeline.sampling`), which packs (image, draw) work into full batches, counts the
votes on the device, and records the passes it ran, the votes it reused from the batch's `VoteCache`
(`pipeline.votes`) and the non-finite outputs it met. The engine knows nothing of certificates or Ray.

A draw is a pure function of (seed, image id, stage, index) (see `pipeline.noise`), so on a CPU the counts
do not depend on the batch size or on which images shared a batch. On a GPU, kernels chosen per shape may
round differently, so counts can depend on the batch size, never on which images shared a batch. The
precision, `channels_last` and `compile` are recorded with every certificate (`Engine.settings`), as what
ran: a compilation that fails falls back to eager, and the record says so.

A model that declares `noise_conditioned = True` (a diffusion denoiser in front of a classifier) takes each
row's noise level with its noisy inputs, `model(inputs, sigma)`: the sessions hand `logits` the sigma of the
stream every row was drawn from, and a clean pass gets sigma 0.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch

from pipeline.batch_probe import probe_batch_size
from pipeline.sampling import Session
from pipeline.votes import Draws, VoteCache

AUTO = "auto"
PRECISIONS = {"fp32": None, "tf32": None, "bf16": torch.bfloat16}  # name -> autocast dtype (None: float32)

log = logging.getLogger(__name__)
_PROBES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {engine settings: its probe}

__all__ = ["AUTO", "PRECISIONS", "Draws", "Engine"]


class Engine:
    """A classifier ready to run on noisy copies of images, whose top-1 predictions its sessions count.

    `precision="fp32"` runs IEEE float32 on every device: TF32 matmuls and convolutions are off inside the
    engine's forward passes, whatever the process's global flags. `"tf32"` lets the device use TF32 (an
    Ampere or later GPU; elsewhere it is fp32). `"bf16"` rounds each noisy input to bf16 (x + sigma * eps is
    computed in fp32 first) and runs the model under bf16 autocast. In every case the counts are exact
    samples of the classifier as it ran, so certificates hold for it, not for an fp32 original.
    `channels_last` stores the model and its inputs in NHWC; `compile` runs the model's forward through
    `torch.compile` (True, the name of a backend, or a backend callable) at one static shape: the chosen
    batch size, the last partial batch padded to it, so it compiles once; clean-image checks and output
    heads run eager. Neither changes what is certified beyond the floating-point rounding of the model.
    """

    def __init__(self, model: torch.nn.Module, *, device: str | torch.device = "cpu", batch_size: int | str = AUTO,
                 precision: str = "fp32", channels_last: bool = False, compile: bool | str = False,
                 chosen_by: str | None = None):
        if batch_size != AUTO and not (isinstance(batch_size, int) and not isinstance(batch_size, bool)
                                       and batch_size >= 1):
            raise ValueError(f"batch_size must be 'auto' or an integer >= 1, got {batch_size!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        if not (isinstance(compile, bool | str) or callable(compile)):
            raise ValueError(f"compile must be true, false or the name of a torch.compile backend, got {compile!r}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._compiled = None
        if compile:
            backend = {} if compile is True else {"backend": compile}
            self._compiled = torch.compile(self.model, dynamic=False, **backend)
        self.batch_size: int | str = batch_size  # "auto" until the first images arrive (`resolve_batch_size`)
        self.probe: dict | None = None
        self.chosen_by = chosen_by  # how a given batch size was chosen, when not by this config ("earlier attempt")
        self.precision = precision
        self.channels_last = bool(channels_last)
        self.compile = compile if isinstance(compile, bool | str) else getattr(compile, "__name__", "callable")
        self.compile_error: str | None = None
        self._num_classes: int | None = None
        self._padded: torch.Tensor | None = None
        self._padded_sigma: torch.Tensor | None = None

    def settings(self) -> dict:
        """What the model ran as, for the certificate's record: precision, layout, compilation and the batch
        size (with the probe's figures when `auto` chose it)."""
        chosen_by = ("probe" if self.probe else self.chosen_by or "config" if self.batch_size != AUTO
                     else "not yet probed")
        batch = {"size": self.batch_size, "chosen_by": chosen_by}
        if self.probe:
            batch["probe"] = {key: value for key, value in self.probe.items() if key != "size"}
        ran = {"precision": self.precision, "tf32": self.uses_tf32, "channels_last": self.channels_last,
               "compile": self.compile, "batch": batch}
        return ran if self.compile_error is None else {**ran, "compile_error": self.compile_error}

    @property
    def uses_tf32(self) -> bool:
        """Whether float32 matmuls and convolutions run in TF32 (precision "tf32" on a GPU that has it)."""
        return (self.precision == "tf32" and self.device.type == "cuda"
                and torch.cuda.get_device_capability(self.device)[0] >= 8)

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
        """`function(inputs)` under inference mode and the configured precision (TF32 on or off as it says)."""
        dtype = PRECISIONS[self.precision]
        with torch.inference_mode(), float32_math(tf32=self.precision == "tf32"), torch.autocast(
                self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return function(inputs)

    @property
    def noise_conditioned(self) -> bool:
        """True when the model takes each row's noise level (`model(inputs, sigma)`)."""
        return bool(getattr(self.model, "noise_conditioned", False))

    def logits(self, inputs: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        """The model's output on a batch of noisy inputs, under inference mode and the configured precision:
        compiled (padded to the batch size, so at one shape) once the batch size is known, else eager.
        `sigma` [N]: each row's noise level, for a noise-conditioned model (None: clean inputs, sigma 0)."""
        if self.noise_conditioned and sigma is None:
            sigma = torch.zeros(len(inputs), device=inputs.device)
        if self._compiled is None or self.batch_size == AUTO or len(inputs) > self.batch_size:
            return self.forward(self._bind(self.model, sigma), inputs)
        padded, rows = self._pad(inputs), len(inputs)
        try:
            return self.forward(self._bind(self._compiled, self._pad_sigma(sigma)), padded)[:rows]
        except Exception as error:  # an unsupported model, no C++ compiler: say so once and run eager
            while (inner := getattr(error, "inner_exception", None) or error.__cause__) is not None:
                error = inner  # the backend's own error, not dynamo's wrapper of it
            self._compiled, self.compile = None, False
            self.compile_error = f"{type(error).__name__}: {(str(error).strip() or '?').splitlines()[0][:300]}"
            log.warning("compile failed, running the model eager: %s", self.compile_error)
            return self.forward(self._bind(self.model, sigma), inputs)

    def _bind(self, model, sigma: torch.Tensor | None):
        """`model` as a function of the inputs alone (with the rows' noise levels, when it takes them)."""
        if not self.noise_conditioned:
            return model
        return lambda inputs: model(inputs, sigma)

    def _pad_sigma(self, sigma: torch.Tensor | None) -> torch.Tensor | None:
        """The rows' noise levels padded like their inputs (`_pad`), in a kept buffer."""
        if sigma is None or len(sigma) == self.batch_size:
            return sigma
        if self._padded_sigma is None or self._padded_sigma.device != sigma.device:
            self._padded_sigma = torch.zeros(self.batch_size, device=sigma.device)
        self._padded_sigma[:len(sigma)].copy_(sigma)
        return self._padded_sigma

    def _pad(self, inputs: torch.Tensor) -> torch.Tensor:
        """`inputs` as a full batch (a partial one copied into a kept buffer of the batch's shape and layout)."""
        if len(inputs) == self.batch_size:
            return inputs
        if self._padded is None or self._padded.shape[1:] != inputs.shape[1:] or self._padded.dtype != inputs.dtype:
            self._padded = torch.empty((self.batch_size, *inputs.shape[1:]), dtype=inputs.dtype, device=self.device,
                                       memory_format=self.input_format()[1]).zero_()
        self._padded[:len(inputs)].copy_(inputs)
        return self._padded

    def num_classes(self, image: torch.Tensor) -> int:
        """Probes the model once, eager, on one clean image, and checks that it returns one score per class."""
        if self._num_classes is None:
            out = self.forward(self.model, image[None].to(self.device, torch.float32))
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


@contextlib.contextmanager
def float32_math(tf32: bool) -> Iterator[None]:
    """Float32 matmuls and cuDNN convolutions in TF32 (`tf32`) or in IEEE float32 inside the block, whatever
    the process's flags; the flags are restored after."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])
