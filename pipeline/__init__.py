"""Certified robustness of image classifiers: randomized-smoothing certifiers over one batched engine."""

from pipeline.certification import certify

__all__ = ["certify"]
