"""Losses for training a denoiser D in front of a frozen classifier f (inputs in [0, 1] pixel space).

Salman et al. (2020): MSE ||D(x + eps) - x||^2, Clf CE(f(D(x + eps)), y), Stab CE(f(D(x + eps)), argmax f(x)).
DE-CROP (Nayak et al. 2023): cosine similarity in logit space, multi-kernel MMD between feature sets, and a
domain discriminator behind a gradient reversal layer with the DANN schedule.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DomainDiscriminator", "cosine_loss", "dann_lambda", "mmd_rbf", "reverse_gradient", "stab_loss"]


def stab_loss(denoised_logits: torch.Tensor, clean_logits: torch.Tensor) -> torch.Tensor:
    """Stability (label consistency): cross-entropy against the classifier's own clean prediction."""
    return F.cross_entropy(denoised_logits, clean_logits.argmax(dim=1))


def cosine_loss(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """1 - mean cosine similarity of logit vectors: 0 when every pair points the same way."""
    return 1 - F.cosine_similarity(logits, target_logits, dim=1).mean()


def mmd_rbf(source: torch.Tensor, target: torch.Tensor, kernels: int = 5, multiplier: float = 2.0) -> torch.Tensor:
    """Squared MMD with a sum of Gaussian kernels (DAN's multi-kernel estimator, biased V-statistic).

    The bandwidths are the mean off-diagonal squared distance (no gradient) times multiplier^(i - kernels // 2),
    i = 0..kernels-1. Needs equal batch sizes.
    """
    if len(source) != len(target):
        raise ValueError(f"mmd_rbf needs equal batch sizes, got {len(source)} and {len(target)}")
    points = torch.cat([source.flatten(1), target.flatten(1)])
    squared = torch.cdist(points, points, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
    count = len(points)
    bandwidth = squared.detach().sum() / (count * count - count)
    kernel = sum(torch.exp(-squared / (bandwidth * multiplier ** (i - kernels // 2) + 1e-9)) for i in range(kernels))
    half = len(source)
    return (kernel[:half, :half] + kernel[half:, half:] - kernel[:half, half:] - kernel[half:, :half]).mean()


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


def reverse_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; the backward pass multiplies the gradient by -scale."""
    return _ReverseGradient.apply(x, scale)


def dann_lambda(progress: float, weight: float = 2.0) -> float:
    """DANN's schedule: weight * (2 / (1 + exp(-10 p)) - 1), rising from 0 at p = 0 to about weight at p = 1."""
    return weight * (2 / (1 + math.exp(-10 * progress)) - 1)


class DomainDiscriminator(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Linear to 2 domains, log-probabilities (trained with NLL)."""

    def __init__(self, features: int, hidden: int = 100):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, 2), nn.LogSoftmax(dim=1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)
