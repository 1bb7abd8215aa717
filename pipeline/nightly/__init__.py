"""The nightly benchmark: a fixed suite certified every night, its figures, and the regression test
against the most recent earlier night.

`regression.py` holds the figures, the matching of like with like and the test (no Ray); `suite.py` runs
the suite on Ray, lists and reads the nights and writes each night's folder and report (`pipeline nightly`,
`jobs/nightly.py`). The figures and the test are importable from here.
"""

from pipeline.nightly.regression import IDENTITY, THROUGHPUT_FIGURES, compare, figures, is_reused, not_compared

__all__ = ["IDENTITY", "THROUGHPUT_FIGURES", "compare", "figures", "is_reused", "not_compared"]
