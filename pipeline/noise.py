"""Seeded noise: every draw is a pure function of (run seed, image id, stage, draw index).

Four kinds, each a `NoiseStream` that writes raw noise for a block of draws and then turns raw rows
into noisy inputs in place (`NOISE_KINDS`; `register_noise` adds another, defined in its own module):

- `Gaussian(sigma)`: x + sigma * eps, eps ~ N(0, I) (Cohen et al.), a float sum: the theorem is about
  real-valued noise, which floating point only approximates (Voracek & Hein 2023).
- `SoundGaussian(sigma)` ("sound_gaussian"): inputs on the 1/255 grid plus integer offsets from the
  Gaussian discretised on the same grid, added exactly and converted to float once, so the smoothed
  classifier is exactly Cohen's smoothing of f o clip o round and its certificates survive floating point
  (for perturbations on the grid). See the class.
- `Splitting(sigma)`: splitting noise, SSN (Levine & Feizi 2021). Each coordinate gets a fresh split
  offset s_i ~ U[0, 2 lambda), lambda = sqrt(3) sigma; the real line is cut at s_i + 2 lambda k and x_i is
  replaced by the centre of its cell, clipped to [0, 1].
- `DerandomizedSplitting(sigma, q, template)`: DSSN. Inputs on the 1/q grid; L = int(2 lambda q) levels;
  draw j (j = 0..L-1, enumerated, not sampled) cuts coordinate i at ((v_i + j) mod L + 0.5) / q with a
  fixed template v in {0..L-1}^d, cells of width L / q.

Random draws come in fixed blocks of `DRAWS_PER_BLOCK`. Block b of a stream holds draws
[b * DRAWS_PER_BLOCK, (b + 1) * DRAWS_PER_BLOCK) and is generated from its own seed, derived from
(run seed, image id, stage, b). Whoever asks for draw i, in whatever batch, next to whichever other
images, gets the same tensor, so counts do not depend on batch size, packing or image order. Streams
with different stage names are independent (Cohen's selection and estimation draws must be).
The values depend on the device type's generator (the CPU's Mersenne Twister, CUDA's Philox): the
same seed gives the same draws on every machine with the same device type and torch version. The
generator is recorded with every certificate (`noise_scheme`).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
from collections.abc import Sequence

import mpmath
import numpy as np
import torch

DRAWS_PER_BLOCK = 64

GRID_TOLERANCE = 1e-3  # in units of one level: float32 images of k/q are within ~1e-5 of the grid
SOUND_UNIT_BITS = 60  # the sound sampler's probabilities are multiples of 2^-60
SOUND_PRECISION_BITS = 160  # mpmath's working precision for its table (>= 80 bits asked)

__all__ = ["DRAWS_PER_BLOCK", "GRID_TOLERANCE", "GUIDE_BITS", "NOISE_KINDS", "DerandomizedSplitting", "Gaussian",
           "NoiseStream", "SoundGaussian", "Splitting", "SplittingAugment", "block_seed", "dssn_levels",
           "dssn_table", "dssn_template", "gaussian_draws", "grid_deviation", "make_noise", "noise_scheme",
           "register_noise", "sound_guide", "sound_masses", "sound_reach", "split_cells", "splitting_lambda",
           "splitting_width"]


def block_seed(seed: int, image_id: str, stage: str, block: int) -> int:
    """The 64-bit generator seed of one block of one noise stream."""
    key = f"{seed}\x1f{image_id}\x1f{stage}\x1f{block}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def noise_scheme(device: torch.device | str) -> str:
    """Names the generator behind the draws on a device, for the certificate's record."""
    kind = torch.device(device).type
    generator = {"cpu": "mt19937", "cuda": "philox"}.get(kind, kind)
    return f"blake2b-blocks{DRAWS_PER_BLOCK}/torch-{kind}-{generator}"


class NoiseStream:
    """Raw noise for blocks of draws of shape [DRAWS_PER_BLOCK, *shape], and the map to noisy inputs.

    Keeps the last block it made, so a block that a batch boundary splits is generated once. Each kind
    seeds its blocks under its own name, so streams of different kinds are independent.
    """

    seed_prefix: str = ""
    can_reject: bool = False  # True: `fill` may mark a draw rejected (its raw row all NaN); see SoundGaussian

    def __init__(self, shape: Sequence[int], device: torch.device | str = "cpu"):
        self.shape = tuple(shape)
        self.device = torch.device(device)
        self.block = torch.empty((DRAWS_PER_BLOCK, *self.shape), device=self.device)
        self._generator = torch.Generator(device=self.device)
        self._held: tuple | None = None

    def fill(self, out: torch.Tensor, seed: int, image_id: str, stage: str, block: int) -> None:
        """Writes the raw noise of `block` into `out` (contiguous, [DRAWS_PER_BLOCK, *shape])."""
        raise NotImplementedError

    def apply(self, image: torch.Tensor, rows: torch.Tensor, out: torch.Tensor | None = None) -> None:
        """Turns raw noise rows into noisy copies of `image`, written to `out` (default: `rows`, in place).

        The arithmetic runs in the rows' dtype (fp32); a lower-precision `out` rounds the noisy input
        once, after the noise is added, in the same pass."""
        raise NotImplementedError

    def get(self, seed: int, image_id: str, stage: str, block: int) -> torch.Tensor:
        """The raw noise of `block` (a view into a buffer that the next call may overwrite)."""
        key = (seed, image_id, stage, block)
        if key != self._held:
            self.fill(self.block, *key)
            self._held = key
        return self.block

    def _seeded(self, seed: int, image_id: str, stage: str, block: int) -> torch.Generator:
        return self._generator.manual_seed(block_seed(seed, image_id, f"{self.seed_prefix}{stage}", block))


class Gaussian(NoiseStream):
    """x + sigma * eps with eps ~ N(0, I), drawn in fp32 before any rounding."""

    def __init__(self, shape, device="cpu", *, sigma: float):
        super().__init__(shape, device)
        self.sigma = float(sigma)

    def fill(self, out, seed, image_id, stage, block):
        torch.randn(out.shape, generator=self._seeded(seed, image_id, stage, block), out=out)

    def apply(self, image, rows, out=None):
        torch.add(image, rows, alpha=self.sigma, out=rows if out is None else out)


def grid_deviation(images: torch.Tensor, q: int = 255) -> torch.Tensor:
    """Per image [B, ...], the largest distance of a value from the 1/q grid, in units of one level."""
    scaled = images.double() * q
    return (scaled - torch.round(scaled)).abs().flatten(1).amax(dim=1)


def sound_reach(sigma: float, q: int = 255) -> tuple[int, int]:
    """(k, J): the sound noise clips z to [-k, k + 1] (z_int to [-q k, q (k + 1)]), k = max(1, floor(6 sigma)),
    and draws offsets j in [-J, J], J = q (k + 1): an offset beyond J clips to the same value as J itself for
    every input in [0, 1], so the two tails are folded into the end bins and nothing is lost to them."""
    k = max(1, math.floor(6 * sigma))
    return k, q * (k + 1)


@functools.lru_cache(maxsize=32)
def sound_masses(sigma: float, q: int = 255) -> tuple[int, ...]:
    """The integer masses (units of 2^-60) of the offsets j = -J..J of the discretised Gaussian: bin j is
    [(j - 1/2)/q, (j + 1/2)/q) under N(0, sigma^2), the end bins reaching to -inf and +inf (`sound_reach`).

    Each mass is the bin's probability, computed by mpmath at SOUND_PRECISION_BITS bits (error far below
    2^-100), times 2^60, less 2^-40, rounded down: never above the true mass, and equal to
    floor(2^60 P(bin)) unless that product lies within 2^-40 of an integer (0 for a bin below one unit).
    Cached per (sigma, q)."""
    _, reach = sound_reach(sigma, q)
    with mpmath.workprec(SOUND_PRECISION_BITS):
        scale, unit, margin = mpmath.mpf(sigma), mpmath.mpf(2) ** SOUND_UNIT_BITS, mpmath.mpf(2) ** -40
        cdf = [mpmath.ncdf((mpmath.mpf(j) - mpmath.mpf(1) / 2) / q, 0, scale) for j in range(-reach + 1, reach + 1)]
        cdf = [mpmath.mpf(0), *cdf, mpmath.mpf(1)]
        return tuple(max(0, int(mpmath.floor((high - low) * unit - margin))) for low, high in itertools.pairwise(cdf))


GUIDE_BITS = 16  # the sound sampler's guide table has 2^16 cells


def sound_guide(cumulative: torch.Tensor, reach: int) -> torch.Tensor:
    """Per cell c of the 60-bit uniforms ([c 2^44, (c + 1) 2^44)), the offset j every u in it gets
    (`searchsorted` at the cell's first and last u agree), or NaN where they differ or the cell reaches the
    leftover (it holds a bin edge, or u that are rejected). float32: offsets are integers below 2^24."""
    width = 2 ** (SOUND_UNIT_BITS - GUIDE_BITS)
    first = torch.arange(2**GUIDE_BITS, dtype=torch.int64, device=cumulative.device) * width
    low = torch.searchsorted(cumulative, first, right=True)
    high = torch.searchsorted(cumulative, first + (width - 1), right=True)
    return torch.where((low == high) & (high < len(cumulative)), (low - reach).to(torch.float32), math.nan)


@functools.lru_cache(maxsize=32)
def _sound_tables(sigma: float, q: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(the cumulative masses, int64; the guide table) on a device, made once per (sigma, q, device)."""
    _, reach = sound_reach(sigma, q)
    cumulative = torch.as_tensor(np.cumsum(sound_masses(sigma, q), dtype=np.int64), device=device)
    return cumulative, sound_guide(cumulative, reach)


class SoundGaussian(NoiseStream):
    """Sound Gaussian noise on the 1/q grid (q = 255; Voracek & Hein 2023, with the sum formed in integers).

    Guarantee: for x on the 1/q grid, the noisy input is z = clip(x_int + j) / q with j drawn from the masses
    of `sound_masses` (each at most the N(0, sigma^2) mass of its bin, which is the law of round(q eps)), so
    the smoothed classifier is Cohen's smoothing of f o clip o round_grid evaluated at x: Cohen's bound holds,
    with the same formula, for every x' on the grid with ||x' - x||_2 < r.

    Sampling: per coordinate one uniform 60-bit integer u, whose bin is `torch.searchsorted(cumulative masses,
    u, right=True)`. u is drawn in two parts, each exact (`torch.randint` over a power of two divides the
    generator's 2^32 or 2^64): its top GUIDE_BITS = 16 bits c for every coordinate, then its low 44 bits only
    where the cell [c 2^44, (c + 1) 2^44) holds a bin edge or leftover (about 2% of the coordinates), in the order
    of the coordinates; the searchsorted runs on those u alone. For every other coordinate all 2^44 values of
    u fall in one bin, which a guide table made once per table by the same search (`sound_guide`) gives from
    c: the same law, at the cost of one 32-bit random number and one lookup per coordinate. The sum
    x_int + j is clipped to [-q k, q (k + 1)] and divided by q once (`apply`; all values are integers below
    2^24, so the fp32 sum is exact integer arithmetic). Everything after z (bf16 rounding, normalisation, a
    denoiser) is a function of z_int: post-processing, which keeps the guarantee.

    Leftover mass: u at or above the masses' total (at most 2J + 1 units of 2^-60 per coordinate: about 9e-16
    at sigma 0.25, 1.8e-15 at 0.5) lands in no bin. A draw (one noisy copy, not its whole batch) with such a
    coordinate is rejected, never redrawn: its raw row is all NaN (`can_reject`), and the engine counts it
    for no class while n keeps counting it (center smoothing, which needs every output, issues no
    certificate for its image instead). Why this keeps
    the guarantee: couple each coordinate with a true rounded Gaussian that equals the sampled bin whenever u
    is not in the leftover (possible as every sampled mass is below the true one); the draws that vote are then
    votes of the true smoothed classifier, so the count of any class is at most its count under exact
    sampling, and a lower confidence bound on it stays valid. Redrawing would renormalise the masses upward,
    which no longer dominates."""

    seed_prefix = "sound/"
    can_reject = True

    def __init__(self, shape, device="cpu", *, sigma: float, q: int = 255):
        super().__init__(shape, device)
        self.sigma, self.q = float(sigma), int(q)
        self.k, self.reach = sound_reach(self.sigma, self.q)
        self.cumulative, self.guide = _sound_tables(self.sigma, self.q, self.device)
        self.bins = len(self.cumulative)

    def offsets(self, uniform: torch.Tensor) -> torch.Tensor:
        """The offsets j of 60-bit uniforms u (int64), as `searchsorted` gives them: j = (the number of
        cumulative masses <= u) - J, J + 1 for a u in the leftover; int64."""
        return torch.searchsorted(self.cumulative, uniform, right=True) - self.reach

    def uniforms(self, seed, image_id, stage, block, out: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block's random numbers, in the order they are drawn: (the top 16 bits c of each coordinate's u,
        int32; the flat positions whose cell is searched; the whole u of those positions, int64), with the
        guide table's offsets (NaN at the searched positions) written to `out`."""
        generator = self._seeded(seed, image_id, stage, block)
        cells = torch.randint(0, 2**GUIDE_BITS, out.shape, dtype=torch.int32, device=self.device, generator=generator)
        torch.index_select(self.guide, 0, cells.view(-1), out=out.view(-1))
        searched = torch.nonzero(torch.isnan(out.view(-1))).squeeze(1)  # cells holding a bin edge: draw low bits
        low = torch.randint(0, 2 ** (SOUND_UNIT_BITS - GUIDE_BITS), searched.shape, dtype=torch.int64,
                            device=self.device, generator=generator)
        return cells, searched, (cells.view(-1)[searched].long() << (SOUND_UNIT_BITS - GUIDE_BITS)) | low

    def fill(self, out, seed, image_id, stage, block):
        _, searched, uniform = self.uniforms(seed, image_id, stage, block, out)
        found = self.offsets(uniform)
        flat = out.view(-1)
        flat[searched] = found.to(out.dtype)
        rejected = torch.div(searched[found > self.reach], flat.numel() // len(out), rounding_mode="floor")
        out[rejected] = math.nan  # a draw with a coordinate in the leftover: rejected whole

    def apply(self, image, rows, out=None):
        level = torch.round(image * self.q)
        rows.add_(level).clamp_(-self.q * self.k, self.q * (self.k + 1)).div_(self.q)
        if out is not None:
            out.copy_(rows)


def splitting_lambda(sigma: float) -> float:
    """lambda = sqrt(3) sigma: the half-width of splitting noise's cells, so that an offset uniform on
    [0, 2 lambda) has standard deviation sigma. Every class probability under it is 1/(2 lambda)-Lipschitz
    in the l1 norm."""
    return math.sqrt(3) * sigma


def splitting_width(sigma: float) -> float:
    """2 lambda (`splitting_lambda`): the width of splitting noise's cells."""
    return 2 * splitting_lambda(sigma)


def split_cells(image: torch.Tensor, splits: torch.Tensor, width: float) -> torch.Tensor:
    """The centre of the cell holding each coordinate, cells [split + width k, split + width (k + 1)),
    clipped to [0, 1]; `splits` broadcasts against `image`."""
    upper = splits + width * torch.ceil((image - splits) / width)
    return (upper.clamp(max=1.0) + (upper - width).clamp(min=0.0)) / 2


class Splitting(NoiseStream):
    """SSN: an independent split offset s_i ~ U[0, 2 lambda) per coordinate, fresh for every draw."""

    seed_prefix = "ssn/"

    def __init__(self, shape, device="cpu", *, sigma: float):
        super().__init__(shape, device)
        self.width = splitting_width(float(sigma))

    def fill(self, out, seed, image_id, stage, block):
        torch.rand(out.shape, generator=self._seeded(seed, image_id, stage, block), out=out)

    def apply(self, image, rows, out=None):
        (rows if out is None else out).copy_(split_cells(image, rows * self.width, self.width))


def dssn_levels(sigma: float, q: int) -> int:
    """L = int(2 lambda q), lambda = sqrt(3) sigma: the number of DSSN offsets (and forward passes)."""
    return int(splitting_width(sigma) * q)


def dssn_template(dimension: int, levels: int, template: str | int = "reference") -> np.ndarray:
    """The fixed template v in {0..L-1}^d. `"reference"` is the reference implementation's
    `numpy.random.RandomState(0).randint(L, size=d)`, so its published models certify identically; an
    integer seeds numpy's PCG64 with (seed, d, L)."""
    if template == "reference":
        return np.random.RandomState(0).randint(levels, size=dimension)
    if isinstance(template, int) and not isinstance(template, bool):
        return np.random.default_rng([template, dimension, levels]).integers(levels, size=dimension)
    raise ValueError(f"template must be 'reference' or an integer seed, got {template!r}")


def template_identity(dimension: int, levels: int, template: str | int) -> str:
    """A record of the template: how it was made and a digest of its values."""
    values = dssn_template(dimension, levels, template)
    digest = hashlib.sha256(values.astype(np.int64).tobytes()).hexdigest()[:16]
    return f"{template}(d={dimension}, L={levels}) sha256:{digest}"


def dssn_table(levels: int, q: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The DSSN noisy value of every (input level k = 0..q, cut level m = 0..L-1), shape [q + 1, L].

    Computed in float64 with the spec's formula (the cut below level k sits at m + 0.5 + L c for the
    largest such c, so the cell's upper end is (m + 0.5 + L ceil((k - m - 0.5) / L)) / q; the value is
    the centre of the cell clipped to [0, 1]) and rounded once to `dtype`."""
    k = torch.arange(q + 1, dtype=torch.float64).view(-1, 1)
    m = torch.arange(levels, dtype=torch.float64).view(1, -1)
    cell = torch.floor((k - m - 1) / levels) + 1  # = ceil((k - m - 0.5) / L) for integers k, m
    upper = (m + 0.5 + levels * cell) / q
    return ((upper.clamp(max=1.0) + (upper - levels / q).clamp(min=0.0)) / 2).to(dtype)


class DerandomizedSplitting(NoiseStream):
    """DSSN: draw j cuts coordinate i at ((v_i + j) mod L + 0.5) / q. No randomness: draws 0..L-1 are every
    cut position once. Exact for inputs on the 1/q grid, in [0, 1].

    Raw rows hold v_i + (j mod L), an integer below 2 L (exact in fp32), whose cut level is m = that mod L.
    `apply` looks each noisy value up by (input level k, v_i + (j mod L)) in `dssn_table` laid out twice
    side by side, so that no remainder is taken per coordinate: the output is the float64 formula rounded
    once to the output's dtype, bit for bit, with no fp32 arithmetic on the values."""

    def __init__(self, shape, device="cpu", *, sigma: float, q: int, template: str | int):
        super().__init__(shape, device)
        self.q, self.levels = int(q), dssn_levels(sigma, q)
        template_values = dssn_template(math.prod(self.shape), self.levels, template)
        self.template = torch.as_tensor(template_values, dtype=torch.float32).view(self.shape).to(self.device)
        self.offsets = torch.arange(DRAWS_PER_BLOCK, device=self.device)

    def shifted_template(self, shifts: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Writes v + (shift mod L) into `out` [len(shifts), *shape], one integer shift per row: the raw
        rows of those draws."""
        shifts = torch.remainder(shifts.to(out.device), self.levels).to(torch.float32).view(-1, *[1] * len(self.shape))
        return torch.add(self.template, shifts, out=out)

    def fill(self, out, seed, image_id, stage, block):
        self.shifted_template(self.offsets + block * DRAWS_PER_BLOCK, out)

    def apply(self, image, rows, out=None):
        target = rows if out is None else out
        # 2 L k + (v + j mod L): integers only, < 2^31; column c of the doubled table is cut level c mod L
        base = torch.round(image.double() * self.q).to(torch.int32) * (2 * self.levels)
        index = rows.to(torch.int32, copy=True).add_(base).reshape(-1)
        table = _doubled_table(self.levels, self.q, target.dtype, self.device)
        if target.is_contiguous():
            torch.index_select(table, 0, index, out=target.view(-1))
        else:
            target.copy_(table[index].view(target.shape))


@functools.lru_cache(maxsize=16)
def _doubled_table(levels: int, q: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`dssn_table` with its L columns repeated once ([q + 1, 2 L], entry 2 L k + c), flattened; made once
    per (L, q, dtype, device)."""
    return dssn_table(levels, q, dtype).repeat(1, 2).flatten().to(device)


# Noise kind (a `Draws`'s `noise`) -> its stream class; `register_noise` adds one.
NOISE_KINDS: dict[str, type[NoiseStream]] = {"gaussian": Gaussian, "sound_gaussian": SoundGaussian, "ssn": Splitting,
                                             "dssn": DerandomizedSplitting}


def register_noise(kind: str, stream: type[NoiseStream]) -> type[NoiseStream]:
    """Makes `kind` name the noise stream class `stream` (built as stream(shape, device, sigma=..., **options));
    returns it. Raises ValueError when the kind names another class."""
    if not (isinstance(stream, type) and issubclass(stream, NoiseStream)):
        raise ValueError(f"register_noise: expected a NoiseStream subclass, got {stream!r}")
    if NOISE_KINDS.get(kind, stream) is not stream:
        raise ValueError(f"register_noise: the noise kind {kind!r} is taken by {NOISE_KINDS[kind].__qualname__}")
    NOISE_KINDS[kind] = stream
    return stream


def make_noise(kind: str, shape: Sequence[int], device, sigma: float, options: tuple = ()) -> NoiseStream:
    """The noise stream of a kind (`NOISE_KINDS`: "gaussian", "sound_gaussian", "ssn", "dssn", and those
    registered) with its options ((name, value) pairs)."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; known: {sorted(NOISE_KINDS)}")
    return NOISE_KINDS[kind](shape, device, sigma=sigma, **dict(options))


class SplittingAugment:
    """Training-time splitting noise for a batch [B, C, H, W] in [0, 1], the same noise as certification:
    SSN (fresh offsets per image) or DSSN (the fixed template plus one random shared offset per image;
    images must be on the 1/q grid)."""

    def __init__(self, kind: str, sigma: float, q: int = 255, template: str | int = "reference"):
        if kind not in ("ssn", "dssn"):
            raise ValueError(f"kind must be 'ssn' or 'dssn', got {kind!r}")
        self.kind, self.sigma, self.q, self.template = kind, sigma, q, template
        self._dssn: DerandomizedSplitting | None = None

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.kind == "ssn":
            width = splitting_width(self.sigma)
            return split_cells(images, width * torch.rand(images.shape, generator=generator), width)
        shape = tuple(images.shape[1:])
        if self._dssn is None or self._dssn.shape != shape:
            self._dssn = DerandomizedSplitting(shape, images.device, sigma=self.sigma, q=self.q,
                                               template=self.template)
        shifts = torch.randint(self._dssn.levels, (len(images),), generator=generator)
        rows = self._dssn.shifted_template(shifts, torch.empty_like(images))
        self._dssn.apply(images, rows)
        return rows


def gaussian_draws(seed: int, image_id: str, stage: str, start: int, stop: int, shape: Sequence[int],
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard-normal draws [start, stop) of one stream, shape [stop - start, *shape] (a fresh tensor)."""
    blocks = Gaussian(shape, device, sigma=1.0)
    parts = []
    index = start
    while index < stop:
        block, offset = divmod(index, DRAWS_PER_BLOCK)
        take = min(stop - index, DRAWS_PER_BLOCK - offset)
        parts.append(blocks.get(seed, image_id, stage, block)[offset:offset + take].clone())
        index += take
    return torch.cat(parts) if parts else torch.empty((0, *shape), device=blocks.device)
