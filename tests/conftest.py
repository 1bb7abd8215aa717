"""Shared fixtures: paths to the reference data, and small models with known behaviour."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "reference"


@pytest.fixture(scope="session")
def reference() -> Path:
    if not REFERENCE.is_dir():
        pytest.fail(f"reference data not found at {REFERENCE}; the project expects ../shared beside it")
    return REFERENCE


class LinearBinary(nn.Module):
    """f(x) = 1[w.x + b > 0] as two logits; its Gaussian-smoothed classifier has robust radius |w.x + b| / ||w||."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.register_buffer("w", w.flatten().float())
        self.b = float(b)

    def margin(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w + self.b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.margin(x)
        return torch.stack([-score, score], dim=1)


@pytest.fixture
def linear_binary() -> type[LinearBinary]:
    return LinearBinary
