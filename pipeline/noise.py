"""Seeded noise: every draw is a pure function of (run seed, image id, stage, draw index).

Draws come in fixed blocks of `DRAWS_PER_BLOCK`. Block b of a stream holds draws
[b * DRAWS_PER_BLOCK, (b + 1) * DRAWS_PER_BLOCK) and is generated from its own seed, derived from
(run seed, image id, stage, b). Whoever asks for draw i, in whatever batch, next to whichever other
images, gets the same tensor, so counts do not depend on batch size, packing or image order.

Streams with different stage names are independent (Cohen's selection and estimation draws must be).
The values depend on the device type's generator (the CPU's Mersenne Twister, CUDA's Philox): the
same seed gives the same draws on every machine with the same device type and torch version. The
generator is recorded with every certificate (`noise_scheme`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

DRAWS_PER_BLOCK = 64

__all__ = ["DRAWS_PER_BLOCK", "GaussianBlocks", "block_seed", "gaussian_draws", "noise_scheme"]


def block_seed(seed: int, image_id: str, stage: str, block: int) -> int:
    """The 64-bit generator seed of one block of one noise stream."""
    key = f"{seed}\x1f{image_id}\x1f{stage}\x1f{block}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def noise_scheme(device: torch.device | str) -> str:
    """Names the generator behind the draws on a device, for the certificate's record."""
    kind = torch.device(device).type
    generator = {"cpu": "mt19937", "cuda": "philox"}.get(kind, kind)
    return f"gaussian/blake2b-blocks{DRAWS_PER_BLOCK}/torch-{kind}-{generator}"


class GaussianBlocks:
    """Standard-normal noise blocks of shape [DRAWS_PER_BLOCK, *shape] on one device.

    Keeps the last block it made, so a block that a batch boundary splits is generated once.
    """

    def __init__(self, shape: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.block = torch.empty((DRAWS_PER_BLOCK, *shape), device=self.device)
        self._generator = torch.Generator(device=self.device)
        self._held: tuple | None = None

    def fill(self, out: torch.Tensor, seed: int, image_id: str, stage: str, block: int) -> None:
        """Writes the standard-normal draws of `block` into `out` (contiguous, [DRAWS_PER_BLOCK, *shape])."""
        self._generator.manual_seed(block_seed(seed, image_id, stage, block))
        torch.randn(out.shape, generator=self._generator, out=out)

    def get(self, seed: int, image_id: str, stage: str, block: int) -> torch.Tensor:
        """The standard-normal draws of `block` (a view into a buffer that the next call may overwrite)."""
        key = (seed, image_id, stage, block)
        if key != self._held:
            self.fill(self.block, *key)
            self._held = key
        return self.block


def gaussian_draws(seed: int, image_id: str, stage: str, start: int, stop: int, shape: Sequence[int],
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard-normal draws [start, stop) of one stream, shape [stop - start, *shape] (a fresh tensor)."""
    blocks = GaussianBlocks(shape, device)
    parts = []
    index = start
    while index < stop:
        block, offset = divmod(index, DRAWS_PER_BLOCK)
        take = min(stop - index, DRAWS_PER_BLOCK - offset)
        parts.append(blocks.get(seed, image_id, stage, block)[offset:offset + take].clone())
        index += take
    return torch.cat(parts) if parts else torch.empty((0, *shape), device=blocks.device)
