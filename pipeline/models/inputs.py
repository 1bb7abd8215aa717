"""The layers put in front of a classifier, inside the model, so noise and radii stay in the dataset's pixel
space: `Normalize` (the classifier's mean and std) and `Resize` (the dataset's crop to the classifier's
input size). Both are deterministic functions of the noisy input, so a certificate for the composed
model is a certificate for what ran."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional

__all__ = ["Normalize", "Resize"]


class Normalize(nn.Module):
    """(x - mean) / std per channel, as the first layer of a model."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Resize(nn.Module):
    """Images [N, C, H, W] resized to `size` (height, width): bicubic, antialiased when shrinking, the
    resampling timm's and Hugging Face's ImageNet classifiers are evaluated behind. Computed in float32
    whatever the input's dtype (a bf16 input is widened exactly; not every device resamples bf16)."""

    def __init__(self, size: Sequence[int]):
        super().__init__()
        self.size = (int(size[0]), int(size[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.interpolate(x.float(), size=self.size, mode="bicubic", antialias=True, align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}, bicubic, antialias"
