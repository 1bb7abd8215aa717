"""Certified-accuracy figures from result rows alone."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import pyarrow as pa

GROUP = ["certifier", "norm", "sigma"]

__all__ = ["certified_accuracy", "summary"]


def certified_accuracy(table: pa.Table, radii: Sequence[float]) -> pd.DataFrame:
    """Approximate certified accuracy at each radius (Cohen et al.): the fraction of images whose certificate
    is correct with radius >= r; abstentions and errors count as failures. One row per certifier setting."""
    rows = table.to_pandas()
    rows = rows[rows["label"].notna()]
    out = {}
    for key, group in rows.groupby(GROUP, sort=True):
        certified = group["correct"].fillna(False).astype(bool) & (group["status"] == "ok")
        out[key] = {f"r={r:g}": float((certified & (group["radius"] >= r)).mean()) for r in radii}
    return pd.DataFrame.from_dict(out, orient="index").rename_axis(GROUP)


def summary(table: pa.Table, radii: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)) -> str:
    """A Markdown table per certifier setting: images, abstention rate, certified accuracy at `radii`, ACR,
    forward passes and seconds per image."""
    rows = table.to_pandas()
    stats = rows.groupby(GROUP, sort=True).agg(
        images=("image_id", "nunique"),
        abstained=("abstained", "mean"),
        passes_per_image=("forward_passes", "mean"),
        seconds_per_image=("wall_time_s", "mean"),
    )
    labeled = rows[rows["label"].notna()]
    if len(labeled):
        correct = labeled["correct"].fillna(False).astype(bool)
        stats = stats.join(certified_accuracy(table, radii))
        stats["ACR"] = (labeled["radius"] * correct).groupby([labeled[c] for c in GROUP]).mean()
    return stats.reset_index().to_markdown(index=False, floatfmt=".3g")
