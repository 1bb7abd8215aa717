"""The demo classifier: a small CNN for 3x32x32 inputs in [0, 1], trained with Gaussian noise.

Its weights ship with the package (`weights/demo_cnn_sigma0.25.pt`, made by `jobs/train_demo_model.py`).
Normalisation is the model's first layer, so noise and radii live in pixel space.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from pipeline.models.inputs import Normalize

WEIGHTS = Path(__file__).with_name("weights") / "demo_cnn.pt"

__all__ = ["WEIGHTS", "DemoCNN", "load_demo_model"]


def _block(channels_in: int, channels_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(channels_out), nn.ReLU(inplace=True))


class DemoCNN(nn.Module):
    """Four conv blocks, global average pooling and a linear head: about 17k parameters."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.normalize = Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
        self.features = nn.Sequential(
            _block(3, width, 1), _block(width, width, 2), _block(width, 2 * width, 2), _block(2 * width, 2 * width, 2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.normalize(x)))


def load_demo_model(path: str | Path = WEIGHTS) -> DemoCNN:
    """The demo CNN with its shipped (or the given) weights, in eval mode."""
    model = DemoCNN()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        reason = "the file is empty" if isinstance(error, EOFError) else str(error) or type(error).__name__
        raise ValueError(f"cannot load demo model weights from {path}: {reason}") from error
    return model.eval()
