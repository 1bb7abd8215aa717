"""`batch_size: auto`: a short timed probe picks the batch size at which a model turns noise into votes fastest.

On a CPU a small CNN runs two to three times faster at 64-128 rows per forward pass than at 1,000 (the
activations of a large batch fall out of cache); on a GPU the best batch is the largest that still gains
and fits. Neither can be known without running the model, so the engine times its own per-batch work
(a session's `count` on one image: seeded noise, the add and cast, the forward, the count) at 1, 2, 4, ...
rows, on the device and in the precision it certifies with, and keeps the fastest.

The probe is bounded. Past 8 rows it stops before a size that would not fit in the time budget (2 s)
and after a size clearly slower than the best so far; reaching 8 rows takes about 6 s for a model as
slow as ResNet-50 at 224 on 2 CPU cores. It also stops at a size that runs out of memory: that size and
every larger one are skipped, and the sizes that ran decide. Only one row not fitting raises. The choice
changes only the speed: every draw is a pure function of (seed, image id, stage, index), so the
certificates are the same for every batch size.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

LARGEST = {"cpu": 2048, "cuda": 8192}
BUDGET_SECONDS = 2.0
TIE = 0.97  # sizes within 3% of the best rate are a tie, which the largest wins: fewer, fuller batches
ALWAYS = 8  # sizes up to this many rows are always compared, however long a pass takes
SLOWER = 0.85  # a size below this fraction of the best rate ends the probe: larger ones only get slower

__all__ = ["BUDGET_SECONDS", "is_out_of_memory", "probe_batch_size"]


OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "cannot allocate memory")  # CUDA's; the CPU allocator's


def is_out_of_memory(error: BaseException) -> bool:
    """True for a device (or host) allocation failure, which a smaller batch may avoid: CUDA's
    OutOfMemoryError, and the CPU allocator's RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    return isinstance(error, torch.OutOfMemoryError | MemoryError) or any(
        marker in str(error).lower() for marker in OUT_OF_MEMORY)


def probe_batch_size(step: Callable[[int], None], device: torch.device, *, budget: float = BUDGET_SECONDS,
                     largest: int | None = None) -> dict:
    """Times `step(rows)` (one batch of the engine's work; it must wait for the device) at 1, 2, 4, ... rows
    up to `largest`: always up to `ALWAYS` rows, then while the next size fits in about `budget` seconds
    and the last was not clearly slower than the best. Returns {"size": the fastest (of sizes within 3% of
    it, the largest), "draws_per_s": {size: rate}, "seconds": the probe's time, "out_of_memory": the
    first size that did not fit, or None}."""
    largest = largest or LARGEST.get(device.type, LARGEST["cpu"])
    started = time.perf_counter()
    _warm_up(step, 1, budget / 8)
    rates: dict[int, float] = {}
    out_of_memory = None
    rows = 1
    while rows <= largest:
        try:
            rate = _rate(step, rows, budget / 4)
        except (RuntimeError, MemoryError) as error:
            if not is_out_of_memory(error):
                raise
            out_of_memory = rows
            _release(device)
            if not rates:
                raise MemoryError("batch_size auto: even one noisy copy per forward pass runs out of memory on "
                                  f"{device}") from error
            break
        rates[rows] = rate
        next_size_seconds = 2 * (2 * rows / rate)  # a warm-up and a timed run, at about twice the time per step
        slower = rate < SLOWER * max(rates.values())
        if rows >= ALWAYS and (slower or time.perf_counter() - started + next_size_seconds > budget):
            break
        rows *= 2
    best = max(rates.values())
    return {"size": max(size for size, rate in rates.items() if rate >= TIE * best),
            "draws_per_s": {str(size): round(rate, 1) for size, rate in rates.items()},
            "seconds": round(time.perf_counter() - started, 3), "out_of_memory": out_of_memory}


def _warm_up(step: Callable[[int], None], rows: int, seconds: float) -> None:
    """Runs `step(rows)` for about `seconds`: a fresh process's first passes (thread pools, allocator, kernel
    selection) run up to 3x slower than later ones and would mislead the comparison."""
    until = time.perf_counter() + seconds
    try:
        while time.perf_counter() < until:
            step(rows)
    except (RuntimeError, MemoryError) as error:
        if not is_out_of_memory(error):
            raise


def _rate(step: Callable[[int], None], rows: int, patience: float) -> float:
    """Rows per second of `step(rows)`: one untimed warm-up, then the best of up to three timed runs
    (one when a run takes longer than `patience`)."""
    step(rows)
    best = float("inf")
    for _ in range(3):
        begun = time.perf_counter()
        step(rows)
        best = min(best, time.perf_counter() - begun)
        if best > patience:
            break
    return rows / best


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
