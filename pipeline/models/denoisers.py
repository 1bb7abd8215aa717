"""Denoisers for pretrained classifiers (Salman et al. 2020): DnCNN and the classifier-denoiser composition.

DnCNN predicts the noise and subtracts it: D(z) = z - dncnn(z). Its last convolution starts at zero, so
a fresh denoiser is the identity. The defaults are the papers' (17 layers, 64 channels; the wide variant
has 128); `depth` and `channels` scale it down for small inputs.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Denoised", "DnCNN"]


class DnCNN(nn.Module):
    """conv+ReLU, (depth - 2) x [conv + BatchNorm + ReLU], conv; residual output, orthogonal init."""

    def __init__(self, image_channels: int = 3, depth: int = 17, channels: int = 64, wide: bool = False):
        super().__init__()
        if depth < 3:
            raise ValueError(f"DnCNN depth must be at least 3, got {depth}")
        channels = 128 if wide else channels
        layers: list[nn.Module] = [nn.Conv2d(image_channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            # momentum 0.95 as in the reference implementation (running statistics follow the latest batch)
            layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                       nn.BatchNorm2d(channels, eps=1e-4, momentum=0.95), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(channels, image_channels, 3, padding=1, bias=False))
        self.dncnn = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.orthogonal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.zeros_(layers[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.dncnn(x)


class Denoised(nn.Module):
    """classifier(denoiser(x)): the base classifier that denoised smoothing certifies."""

    def __init__(self, classifier: nn.Module, denoiser: nn.Module):
        super().__init__()
        self.classifier, self.denoiser = classifier, denoiser

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.denoiser(x))
