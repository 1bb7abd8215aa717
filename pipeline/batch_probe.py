"""`batch_size: auto`: a short timed probe picks the batch size at which a model turns noise into votes fastest.

On a CPU a small CNN runs about three times faster at 250 rows per forward pass than at 1,000 (the
activations of a large batch fall out of cache); on a GPU the best batch is the largest that still gains
and fits. Neither can be known without running the model, so the engine times the whole per-batch work
(Gaussian noise, the add, the cast to the input dtype, the forward and the argmax) at doubling batch sizes,
on the device and in the precision it certifies with, and keeps the fastest.

The probe is bounded: it stops at the time budget, when a size is clearly slower than the best so far, and
at a size that runs out of memory (that size and every larger one are skipped; the sizes that ran decide).
A probe in which even one row runs out of memory raises. The choice changes only the speed: every draw is
a pure function of (seed, image id, stage, index), so the certificates are the same for every batch size.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

SMALLEST = 16
LARGEST = {"cpu": 2048, "cuda": 8192}
BUDGET_SECONDS = 2.0
SLOWER = 0.85  # a size below this fraction of the best rate ends the probe: larger ones only get slower

__all__ = ["BUDGET_SECONDS", "is_out_of_memory", "probe_batch_size"]


def is_out_of_memory(error: BaseException) -> bool:
    """True for a device (or host) allocation failure, which a smaller batch may avoid."""
    return isinstance(error, torch.OutOfMemoryError | MemoryError) or "out of memory" in str(error).lower()


def probe_batch_size(step: Callable[[int], None], device: torch.device, *, budget: float = BUDGET_SECONDS,
                     smallest: int = SMALLEST, largest: int | None = None) -> dict:
    """Times `step(rows)` (one batch of the engine's work; it must wait for the device) at smallest,
    2 x smallest, ... up to `largest`, within about `budget` seconds; returns {"size": the fastest,
    "draws_per_s": {size: rate}, "seconds": the probe's time, "out_of_memory": the first size that did not
    fit, or None}."""
    largest = largest or LARGEST.get(device.type, LARGEST["cpu"])
    started = time.perf_counter()
    _warm_up(step, smallest, budget / 8)
    rates: dict[int, float] = {}
    out_of_memory = None
    rows = smallest
    while rows <= largest:
        try:
            rate = _rate(step, rows, budget / 4)
        except (RuntimeError, MemoryError) as error:
            if not is_out_of_memory(error):
                raise
            out_of_memory = rows
            _release(device)
            if rates:
                break
            if rows == 1:
                raise MemoryError("batch_size auto: even one noisy copy per forward pass runs out of memory on "
                                  f"{device}") from error
            smallest = rows = max(1, rows // 2)  # nothing fitted yet: go down until something does
            largest = rows
            continue
        rates[rows] = rate
        if rate < SLOWER * max(rates.values()) or time.perf_counter() - started > budget:
            break
        rows *= 2
    return {"size": max(rates, key=rates.get), "draws_per_s": {str(size): round(rate, 1) for size, rate in
                                                                 rates.items()},
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
