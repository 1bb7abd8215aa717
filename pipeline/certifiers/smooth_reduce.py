"""Joshi et al. (2022): Smooth-Reduce, patch ensembles reduced by max or mean, with a sound input-space radius.

The image is resized (optionally) to `resize_to`, cut into `num_patches` square patches of the base
model's input size, each patch scored by the base model, and the scores (softmax or logits) reduced over
patches per class by mean or max; the vote is the top class. Cohen's CERTIFY runs on the votes. The patch
placement is part of the base classifier, so it is the same for every input: a grid, or random corners
drawn once per run from the run seed and the sizes (recorded in each row's params), never from the image.

- `noise="shared"` (default): one Gaussian draw on the original input, then resize, patches, reduction.
  That pipeline is one base classifier, so Cohen's radius sigma Phi^-1(p_lower) holds in input space.
- `noise="independent"` (the reference code's sampling): independent noise on every patch, in the
  resized space. The smoothed classifier is g(P A x) (A: resize, P: stacked patches), so Cohen's radius
  holds for ||P A delta||, and ||P A delta|| <= sqrt(m_max) ||A||_op ||delta||, m_max being the largest
  number of patches covering one pixel (duplicates counted). The reported radius is divided by both;
  the reference code reports it undivided, which overstates robustness by up to sqrt(m_max) ||A||_op.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.certifiers.base import ESTIMATION, SELECTION, Certificate, Certifier, Cost, GaussianNoise
from pipeline.certifiers.cohen import certificate_from_counts, sequential_certificate
from pipeline.certifiers.cohen import max_radius as cohen_max_radius
from pipeline.certifiers.sequential import SEQUENTIAL_MODES, SequentialOptions, top_class
from pipeline.engine import Draws, Engine
from pipeline.sampling import Session

REDUCTIONS = ("mean", "max")

__all__ = ["REDUCTIONS", "SmoothReduce", "multiplicity", "patch_corners", "resize_operator_norm"]


def resize(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Bilinear resize to size x size (align_corners=False, no antialiasing): a fixed linear map A."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


@functools.lru_cache(maxsize=64)
def resize_operator_norm(height: int, width: int, size: int | None) -> float:
    """||A||_op of the bilinear resize from height x width to size x size, exactly: the 2-D map is the
    Kronecker product of two 1-D interpolation matrices, so its largest singular value is the product
    of theirs (each from a dense SVD)."""
    if size is None or (height, width) == (size, size):
        return 1.0

    def one_axis(length: int) -> float:
        basis = torch.eye(length, dtype=torch.float64).view(length, 1, length, 1)
        matrix = F.interpolate(basis, size=(size, 1), mode="bilinear", align_corners=False).view(length, size).T
        return float(np.linalg.norm(matrix.numpy(), 2))

    return one_axis(height) * one_axis(width)


def patch_corners(size: int, patch: int, count: int | None, stride: int = 1, placement: str = "grid",
                  seed: int = 0) -> np.ndarray:
    """Top-left corners [k, 2] (row, column) of the patches on a size x size image.

    Grid: every `stride`-th position in row-major order (what `unfold` gives), the first `count`.
    Random: `count` corners uniform over all valid positions, duplicates allowed, drawn from the run seed
    and the sizes alone. The placement is part of the smoothed classifier, so it must not depend on the
    input: corners that moved with the pixels would certify x with one ensemble and meet x' with another.
    """
    positions = size - patch + 1
    if positions < 1:
        raise ValueError(f"smooth_reduce: patch_size={patch} is larger than the (resized) image, {size}x{size}")
    if placement == "grid":
        steps = range(0, positions, stride)
        corners = np.array([(row, column) for row in steps for column in steps], dtype=np.int64)
        if count is not None:
            if count > len(corners):
                raise ValueError(f"smooth_reduce: num_patches={count} but the grid at stride {stride} has only "
                                 f"{len(corners)} patches")
            corners = corners[:count]
        return corners
    key = hashlib.blake2b(f"{seed}\x1f{size}\x1f{patch}\x1f{count}\x1fpatches".encode(), digest_size=8).digest()
    generator = np.random.default_rng(int.from_bytes(key, "little"))
    return generator.integers(0, positions, size=(count, 2))


def multiplicity(size: int, patch: int, corners: np.ndarray) -> int:
    """The largest number of patches covering one pixel, duplicates counted."""
    cover = np.zeros((size, size), dtype=np.int64)
    for row, column in corners:
        cover[row:row + patch, column:column + patch] += 1
    return int(cover.max())


def extract(images: torch.Tensor, corners: torch.Tensor, patch: int) -> torch.Tensor:
    """Patches [R, k, C, patch, patch] of images [R, C, S, S] at per-row corners [R, k, 2]."""
    offsets = torch.arange(patch, device=images.device)
    rows = (corners[..., 0, None] + offsets)[:, :, :, None]  # [R, k, p, 1]
    columns = (corners[..., 1, None] + offsets)[:, :, None, :]  # [R, k, 1, p]
    batch = torch.arange(len(images), device=images.device)[:, None, None, None]
    return images.permute(0, 2, 3, 1)[batch, rows, columns].permute(0, 1, 4, 2, 3)


class PatchVote(torch.nn.Module):
    """Scores of the base model on every patch, reduced over patches: [R, num_classes].

    With `corners` (shared noise) the inputs are noisy images, resized and cut here; without, they are
    noisy stacks of patches [R, k * channels, patch, patch] (independent noise).
    """

    def __init__(self, model, patch: int, channels: int, reduce: str, scores: str, resize_to: int | None = None,
                 corners: torch.Tensor | None = None):
        super().__init__()
        self.model, self.patch, self.channels = model, patch, channels
        self.reduce, self.scores, self.resize_to, self.corners = reduce, scores, resize_to, corners

    def forward(self, inputs: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        if self.corners is None:
            patches = inputs.view(len(inputs), -1, self.channels, self.patch, self.patch)
        else:
            patches = extract(resize(inputs, self.resize_to), self.corners[image_index], self.patch)
        scores = self.model(patches.flatten(0, 1)).float()
        if self.scores == "softmax":
            scores = torch.softmax(scores, dim=1)
        scores = scores.view(len(inputs), patches.shape[1], -1)
        return scores.mean(dim=1) if self.reduce == "mean" else scores.amax(dim=1)


@dataclass(frozen=True, kw_only=True)
class SmoothReduce(GaussianNoise, SequentialOptions, Certifier):
    """Smooth-Reduce with Cohen's CERTIFY on the reduced votes; the radius is in the original input space.
    `mode="sequential"` (target `radii`, in input space) and `mode="max_radius"` stop each image once
    decided, n being the budget (see `pipeline.certifiers.sequential`). `gaussian` picks the noise
    (`GaussianNoise`); the sound noise needs `noise="shared"` (independent noise is drawn on resized patches,
    which are off the grid), so "auto" resolves to "real" with independent noise."""

    name: ClassVar[str] = "smooth_reduce"
    own_head: ClassVar[bool] = True

    patch_size: int
    num_patches: int | None = None
    resize_to: int | None = None
    stride: int = 1
    placement: str = "grid"
    reduce: str = "mean"
    scores: str = "softmax"
    noise: str = "shared"
    n0: int = 100
    n: int = 10_000
    mode: str = "certify"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require_choice("mode", ("certify", *SEQUENTIAL_MODES))
        self._require_count("patch_size", 1)
        self._require_count("stride", 1)
        self._require_count("n0", 1)
        self._require_count("n", 1)
        self._require_choice("placement", ("grid", "random"))
        self._require_choice("reduce", REDUCTIONS)
        self._require_choice("scores", ("softmax", "logits"))
        self._require_choice("noise", ("shared", "independent"))
        self._check_gaussian()
        if self.gaussian == "sound" and self.noise == "independent":
            raise ValueError(f"{self.name}: gaussian='sound' needs noise='shared': independent noise is drawn on "
                             f"the resized patches, which are not on the 1/255 grid")
        if self.num_patches is not None:
            self._require_count("num_patches", 1)
        elif self.placement == "random":
            raise ValueError(f"{self.name}: random placement needs num_patches")
        if self.resize_to is not None:
            self._require_count("resize_to", 1)
        self._check_sequential()

    @property
    def self_sampling(self) -> bool:
        return True

    def max_radius(self, num_classes: int | None = None, details: Mapping | None = None) -> float | None:
        """Cohen's largest CERTIFY radius (all n votes for one class) times the certificate's radius factor
        (1 for shared noise; recorded in `details` for independent noise, None without it). None in the
        sequential modes."""
        factor = 1.0 if self.noise == "shared" else (details or {}).get("radius_factor")
        if self.sequential or factor is None:
            return None
        return cohen_max_radius(self.sigma, self.n, self.alpha) * factor

    def plan(self, image_shape: Sequence[int], seed: int) -> tuple[np.ndarray, int, int]:
        """(patch corners, resized side, largest pixel multiplicity) for images of this shape: one plan per
        run seed and input size, the same for every image."""
        _, height, width = image_shape
        size = self.resize_to or height
        if self.resize_to is None and height != width:
            raise ValueError(f"{self.name}: square images are needed without resize_to, got {height}x{width}")
        corners = patch_corners(size, self.patch_size, self.num_patches, self.stride, self.placement, seed)
        return corners, size, multiplicity(size, self.patch_size, corners)

    def num_classes(self, engine: Engine, image: torch.Tensor) -> int:
        corners, _, _ = self.plan(image.shape, 0)
        first = extract(resize(image[None].to(engine.device, torch.float32), self.resize_to),
                        torch.as_tensor(corners[None, :1], device=engine.device), self.patch_size)
        return int(engine.forward(engine.model, first[:, 0]).shape[1])

    def reusable_draws(self, labeled: bool) -> list[Draws]:
        """None: the votes are the patch ensemble's, not the base model's."""
        return []

    def for_inputs(self, on_grid: bool) -> SmoothReduce:
        """"auto" resolves as for every Gaussian certifier, but to "real" with independent noise."""
        return super().for_inputs(on_grid and self.noise == "shared")

    def run(self, session: Session, images: torch.Tensor, image_ids: list[str], seed: int,
            labels: list[int | None] | None = None) -> list[Certificate]:
        """Votes of the patch ensemble through the session; each draw's forward pass per patch is in its
        certificate's cost."""
        engine = session.engine
        plan, size, overlap = self.plan(images.shape[1:], seed)
        corners = torch.as_tensor(plan, device=engine.device).expand(len(images), *plan.shape)
        patches_per_draw = len(plan)
        norm = resize_operator_norm(images.shape[2], images.shape[3], self.resize_to)
        if self.noise == "shared":
            inputs = images
            head = PatchVote(engine.model, self.patch_size, images.shape[1], self.reduce, self.scores, self.resize_to,
                             corners)
        else:  # independent noise: the engine's "image" is the stack of clean patches of the resized image
            clean = extract(resize(images.to(engine.device), self.resize_to), corners, self.patch_size)
            inputs = clean.flatten(1, 2)
            head = PatchVote(engine.model, self.patch_size, images.shape[1], self.reduce, self.scores)
        batch_size = max(1, engine.resolve_batch_size((images.shape[1], self.patch_size, self.patch_size))
                         // patches_per_draw)
        factor = 1.0 if self.noise == "shared" else 1.0 / (math.sqrt(overlap) * norm)
        if self.sequential:
            def procedure():
                top, outcome = yield from top_class(self, scale=factor)
                return sequential_certificate(top, outcome, self.sigma, self.n0, scale=factor)

            voted = session.sequential(inputs, image_ids, seed, [procedure() for _ in image_ids], head=head,
                                       batch_size=batch_size)
        else:
            selection, estimation = self.noise_draws(SELECTION, self.n0), self.noise_draws(ESTIMATION, self.n)
            counts = session.count(inputs, image_ids, seed, [selection, estimation], head=head, batch_size=batch_size)
            voted = [certificate_from_counts(counts[selection][index], counts[estimation][index], self.sigma,
                                             self.alpha) for index in range(len(images))]
        details = {"patch_corners": plan.tolist(), "placement_seed": seed if self.placement == "random" else None,
                   "resized_side": size, "max_multiplicity": overlap, "resize_operator_norm": norm,
                   "radius_factor": factor}
        certificates = []
        for certificate in voted:
            votes = certificate.cost  # one vote per draw, each a forward pass per patch
            radius = certificate.radius  # the sequential radius is in input space already
            extra = {} if self.sequential else {"uncorrected_radius": radius}
            if not self.sequential:
                radius *= factor
            certificates.append(dataclasses.replace(
                certificate, radius=radius, details={**details, **extra, **(certificate.details or {})},
                cost=Cost(votes.n, votes.n0, patches_per_draw * votes.forward_passes)))
        return certificates
