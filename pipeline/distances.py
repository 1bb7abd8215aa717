"""Output distances for center smoothing, each with its relaxed-triangle constant K: d(a, c) <= K (d(a, b) + d(b, c)).

Every metric compares batches of outputs pair by pair (`paired(a, b)`, a and b of shape [N, ...] -> [N])
and all against all (`pairwise(a, b)`, [P, ...] x [Q, ...] -> [P, Q]). Torch only, so they run where the
outputs are (GPU or CPU). Whatever the outputs' dtype (a bf16 model's, say), every distance is computed
and returned in at least fp32 (fp64 inputs stay fp64): a certificate's order statistic is never rounded
to the model's precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

__all__ = ["METRICS", "Metric", "get_metric"]

PAIRWISE_BUDGET = 1 << 24  # elements per broadcast block in the default all-against-all


def wide_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    """The common dtype of a and b, at least fp32."""
    return torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)


def widen(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a and b in their common dtype, at least fp32."""
    dtype = wide_dtype(a, b)
    return a.to(dtype), b.to(dtype)


@dataclass(frozen=True)
class Metric:
    """A distance between outputs, with its relaxed-triangle constant K (1 for a true metric)."""

    name: ClassVar[str]
    triangle_constant: ClassVar[float] = 1.0

    def paired(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pairwise(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """All distances between rows of a and rows of b, broadcast in blocks that fit PAIRWISE_BUDGET."""
        rows = max(1, PAIRWISE_BUDGET // max(1, b[0].numel() * len(b)))
        blocks = [self.paired(a[i:i + rows, None].expand(-1, len(b), *a.shape[1:]).flatten(0, 1),
                              b[None].expand(len(a[i:i + rows]), *b.shape).flatten(0, 1)).view(-1, len(b))
                  for i in range(0, len(a), rows)]
        return torch.cat(blocks)

    @property
    def radius_coefficient(self) -> float:
        """eps_out = K (1 + 2K) R: 3 for a true metric (Kumar & Goldstein, with beta = 2K)."""
        k = self.triangle_constant
        return k * (1 + 2 * k)


class L2(Metric):
    name = "l2"

    def paired(self, a, b):
        a, b = widen(a, b)
        return (a - b).flatten(1).norm(dim=1)

    def pairwise(self, a, b):
        a, b = widen(a, b)
        return torch.cdist(a.flatten(1), b.flatten(1), compute_mode="donot_use_mm_for_euclid_dist")


class Angular(Metric):
    """arccos(cosine similarity) / pi, in [0, 1]: the angle between the flattened outputs."""

    name = "angular"

    def paired(self, a, b):
        dtype = wide_dtype(a, b)
        cosine = torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)
        return (torch.arccos(cosine.clamp(-1, 1)) / math.pi).to(dtype)

    def pairwise(self, a, b):
        """All against all as one fp64 product of the unit rows (cosine_similarity's own normalisation, norms
        clamped at its eps), instead of broadcasting every pair: the exact centre search is n x n."""
        dtype = wide_dtype(a, b)

        def unit(x):
            x = x.flatten(1).double()
            return x / x.norm(dim=1, keepdim=True).clamp_min(1e-8)

        cosine = unit(a) @ unit(b).T
        return (torch.arccos(cosine.clamp(-1, 1)) / math.pi).to(dtype)


class TotalVariation(Metric):
    """Total variation distance between probability vectors: half their l1 distance."""

    name = "total_variation"

    def paired(self, a, b):
        a, b = widen(a, b)
        return 0.5 * (a - b).flatten(1).abs().sum(dim=1)


@dataclass(frozen=True)
class ImageTV(Metric):
    """Total variation of the difference image [N, C, H, W]: vertical and horizontal finite differences,
    the l_p norm across channels at each position (p = 1: tv1, p = 2: tv2), summed over positions. A
    seminorm of a - b, so the triangle inequality holds with K = 1."""

    p: int = 1

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"tv{self.p}"

    def paired(self, a, b):
        a, b = widen(a, b)
        difference = a - b
        if difference.ndim != 4:
            raise ValueError(f"{self.name} compares images [N, C, H, W], got shape {tuple(a.shape)}")
        vertical = difference[:, :, 1:, :] - difference[:, :, :-1, :]
        horizontal = difference[:, :, :, 1:] - difference[:, :, :, :-1]
        return (vertical.norm(p=self.p, dim=1).flatten(1).sum(1)
                + horizontal.norm(p=self.p, dim=1).flatten(1).sum(1))


class Jaccard(Metric):
    """1 - IoU of axis-aligned boxes (x1, y1, x2, y2). A box with no area (such as "no detection",
    (-1, -1, -1, -1)) is the empty set: two empty boxes are at distance 0, an empty and a non-empty one
    at distance 1, as for the Jaccard distance of sets (a metric)."""

    name = "jaccard"

    def paired(self, a, b):
        a, b = a.reshape(-1, 4).double(), b.reshape(-1, 4).double()

        def area(box):
            return (box[:, 2] - box[:, 0]).clamp(min=0) * (box[:, 3] - box[:, 1]).clamp(min=0)

        low = torch.maximum(a[:, :2], b[:, :2])
        high = torch.minimum(a[:, 2:], b[:, 2:])
        intersection = (high - low).clamp(min=0).prod(dim=1)
        union = area(a) + area(b) - intersection
        both_empty = union <= 0
        iou = torch.where(both_empty, torch.ones_like(union), intersection / union.clamp(min=1e-300))
        return 1 - iou


METRICS: dict[str, Metric] = {metric.name: metric for metric in
                              (L2(), Angular(), TotalVariation(), ImageTV(1), ImageTV(2), Jaccard())}


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {name!r}")
    return METRICS[name]
