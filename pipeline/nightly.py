"""Nightly benchmark figures and the regression test between two nights.

Figures per (model, setting): certified accuracy at the suite's radii and the abstention rate (proportions
over the images, with their counts), ACR, and cost: images/s, forward passes per image, device-seconds per
image and the cost per image at a configured price per device-hour.

A change of a proportion is a regression only when it exceeds the certification's own sampling noise:
a one-sided Fisher exact test on the 2x2 table (tonight's and last night's successes and failures),
significant at `alpha` divided by the number of proportions compared (Bonferroni), in the bad direction
(accuracy down, abstention up). A throughput drop beyond `throughput_tolerance` (a fraction) is a
regression. ACR and the other cost figures are reported, not tested.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import pyarrow as pa
from scipy.stats import fisher_exact

from pipeline.report import acr, certified_counts

__all__ = ["compare", "figures"]

WORSE_WHEN_LOWER = "lower"
WORSE_WHEN_HIGHER = "higher"


def figures(model: str, results: pa.Table, radii: Sequence[float], seconds: float, devices: int,
            price_per_device_hour: float) -> pd.DataFrame:
    """One row per figure: model, setting, figure, value, successes and count (for proportions), kind."""
    rows = results.to_pandas()
    out = []
    for setting, group in rows.groupby("setting", sort=True):
        images = len(group)
        if group["correct"].notna().any():
            for radius, successes in zip(radii, certified_counts(group, radii), strict=True):
                out.append((setting, f"certified_accuracy@{radius:g}", successes / images, successes, images,
                            "proportion", WORSE_WHEN_LOWER))
            out.append((setting, "acr", acr(group), None, images, "accuracy", None))
        abstained = int(group["abstained"].sum())
        out.append((setting, "abstention_rate", abstained / images, abstained, images, "proportion",
                    WORSE_WHEN_HIGHER))
        out.append((setting, "forward_passes_per_image", float(group["forward_passes"].mean()), None, images,
                    "cost", None))
    images = rows["image_id"].nunique()
    device_seconds = seconds * devices / max(1, images)
    for name, value in (("images_per_s", images / seconds), ("device_seconds_per_image", device_seconds),
                        ("cost_per_image", device_seconds / 3600 * price_per_device_hour)):
        out.append(("all", name, value, None, images, "cost", WORSE_WHEN_LOWER if name == "images_per_s" else None))
    frame = pd.DataFrame(out, columns=["setting", "figure", "value", "successes", "count", "kind", "worse_when"])
    frame.insert(0, "model", model)
    return frame


def compare(tonight: pd.DataFrame, last: pd.DataFrame, alpha: float = 0.001,
            throughput_tolerance: float = 0.3) -> pd.DataFrame:
    """The figures of both nights side by side, with `regression` (bool) and `reason` for each."""
    keys = ["model", "setting", "figure"]
    both = tonight.merge(last, on=keys, suffixes=("", "_last"), how="inner")
    tested = both["kind"] == "proportion"
    level = alpha / max(1, int(tested.sum()))
    regression, reasons = [], []
    for _, row in both.iterrows():
        flagged, reason = False, ""
        if row["kind"] == "proportion":
            table = [[row["successes_last"], row["count_last"] - row["successes_last"]],
                     [row["successes"], row["count"] - row["successes"]]]
            side = "greater" if row["worse_when"] == WORSE_WHEN_LOWER else "less"
            p_value = fisher_exact(table, alternative=side).pvalue
            flagged = p_value < level
            reason = f"Fisher exact one-sided p = {p_value:.2g} (threshold {level:.2g})"
        elif row["figure"] == "images_per_s":
            drop = 1 - row["value"] / row["value_last"] if row["value_last"] else 0.0
            flagged = drop > throughput_tolerance
            reason = f"throughput {drop:+.1%} lower (tolerance {throughput_tolerance:.0%})"
        regression.append(bool(flagged))
        reasons.append(reason)
    both["regression"] = regression
    both["reason"] = reasons
    return both[[*keys, "value_last", "value", "regression", "reason"]]
