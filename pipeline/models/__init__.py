"""Models: the demo CNN and the normalisation layer that sits first inside every model."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.models.demo import DemoCNN, Normalize, load_demo_model

__all__ = ["DemoCNN", "Normalize", "load_demo_model", "load_model"]


def load_model(spec: dict[str, Any]) -> torch.nn.Module:
    """The classifier named by a model entry of a run config, in eval mode."""
    if spec.get("name") != "demo_cnn":
        raise ValueError(f"model.name: unknown model {spec.get('name')!r}")
    return load_demo_model(spec["weights"]) if spec.get("weights") else load_demo_model()
