"""Certified robustness of image classifiers: randomized-smoothing certifiers over one batched engine."""

__all__ = ["certify"]


def __getattr__(name: str):
    """`pipeline.certify`, imported on first use, so `import pipeline.cli` starts without loading torch."""
    if name == "certify":
        from pipeline.certification import certify

        return certify
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
