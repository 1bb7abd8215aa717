"""Models. For now: the demo CNN and the normalisation layer that sits first inside every model."""

from pipeline.models.demo import DemoCNN, Normalize, load_demo_model

__all__ = ["DemoCNN", "Normalize", "load_demo_model"]
