"""Nightly benchmark figures and the regression test between two nights.

Figures per (model, setting), each with the setting's `norm` and `targets` as its rows recorded them (null
for results without those columns): certified accuracy at the suite's radii and the abstention rate (proportions
over all the run's images, with their counts), ACR, and cost: forward passes per image; per model, images/s,
device-seconds per image and the cost per image at a configured price per device-hour. The throughput
figures measure only the work done tonight: the images tonight's attempt certified over tonight's seconds,
with `count` the number of those images. A night whose runs were all certified by an earlier attempt (a
rerun of the same date) measured no throughput: its throughput figures are NaN (`is_reused`).

A change of a proportion is a regression only when it exceeds the certification's own sampling noise:
a one-sided Fisher exact test on the 2x2 table (tonight's and last night's successes and failures),
significant at `alpha` divided by the number of proportions compared (Bonferroni), in the bad direction
(accuracy down, abstention up). A throughput drop beyond `throughput_tolerance` (a fraction) is a
regression; a reused throughput, tonight's or last night's, is never compared. ACR and the other cost
figures are reported, not tested.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import pyarrow as pa
from scipy.stats import fisher_exact

from pipeline.report import acr, certified_counts, recorded_targets

__all__ = ["THROUGHPUT_FIGURES", "compare", "figures", "is_reused"]

WORSE_WHEN_LOWER = "lower"
WORSE_WHEN_HIGHER = "higher"
THROUGHPUT_FIGURES = ("images_per_s", "device_seconds_per_image", "cost_per_image")
COLUMNS = ["setting", "norm", "targets", "figure", "value", "successes", "count", "kind", "worse_when"]


def figures(model: str, results: pa.Table, radii: Sequence[float], seconds: float, devices: int,
            price_per_device_hour: float, certified_tonight: int) -> pd.DataFrame:
    """One row per figure: model, setting, its norm and target radii, figure, value, successes and count (for
    proportions), kind. Accuracy and abstention come from all of `results`; throughput from the
    `certified_tonight` images that tonight's attempt certified in `seconds` on `devices` devices (NaN when
    it certified none)."""
    rows = results.to_pandas()
    rows = rows.assign(**{column: None for column in ("norm", "targets") if column not in rows})
    out = [row for setting, group in rows.groupby("setting", sort=True) for row in _setting_figures(
        setting, group, radii)]
    out += _throughput_figures(certified_tonight, seconds, devices, price_per_device_hour)
    frame = pd.DataFrame(out, columns=COLUMNS)
    frame.insert(0, "model", model)
    return frame


def _setting_figures(setting: str, group: pd.DataFrame, radii: Sequence[float]) -> list[tuple]:
    """Certified accuracy at `radii` and ACR (where the rows are labeled), abstention, forward passes."""
    images = len(group)
    head = (setting, group["norm"].iloc[0], list(recorded_targets(group) or ()))
    out = []
    if group["correct"].notna().any():
        for radius, successes in zip(radii, certified_counts(group, radii), strict=True):
            out.append((*head, f"certified_accuracy@{radius:g}", successes / images, successes, images,
                        "proportion", WORSE_WHEN_LOWER))
        out.append((*head, "acr", acr(group), None, images, "accuracy", None))
    abstained = int(group["abstained"].sum())
    out.append((*head, "abstention_rate", abstained / images, abstained, images, "proportion", WORSE_WHEN_HIGHER))
    out.append((*head, "forward_passes_per_image", float(group["forward_passes"].mean()), None, images, "cost",
                None))
    return out


def _throughput_figures(certified: int, seconds: float, devices: int, price_per_device_hour: float) -> list[tuple]:
    """images/s, device-seconds and cost per image over the `certified` images of tonight; NaN for none."""
    if certified:
        device_seconds = seconds * devices / certified
        values = (certified / seconds, device_seconds, device_seconds / 3600 * price_per_device_hour)
    else:
        values = (math.nan,) * len(THROUGHPUT_FIGURES)
    return [("all", None, [], name, value, None, certified, "cost",
             WORSE_WHEN_LOWER if name == "images_per_s" else None)
            for name, value in zip(THROUGHPUT_FIGURES, values, strict=True)]


def is_reused(night: pd.DataFrame) -> pd.Series:
    """Per row of a night's figures: a throughput figure that was not measured (tonight certified nothing)."""
    return night["figure"].isin(THROUGHPUT_FIGURES) & night["value"].isna()


def compare(tonight: pd.DataFrame, last: pd.DataFrame, alpha: float = 0.001,
            throughput_tolerance: float = 0.3) -> pd.DataFrame:
    """The figures of both nights side by side, with `regression` (bool) and `reason` for each."""
    keys = ["model", "setting", "figure"]
    both = tonight.merge(last, on=keys, suffixes=("", "_last"), how="inner")
    level = alpha / max(1, int((both["kind"] == "proportion").sum()))
    tests = [_test(row, level, throughput_tolerance) for _, row in both.iterrows()]
    both["regression"] = [flagged for flagged, _ in tests]
    both["reason"] = [reason for _, reason in tests]
    return both[[*keys, "value_last", "value", "regression", "reason"]]


def _test(row: pd.Series, level: float, throughput_tolerance: float) -> tuple[bool, str]:
    """Whether one figure regressed, and why (empty reason for figures that are only reported)."""
    if row["kind"] == "proportion":
        table = [[row["successes_last"], row["count_last"] - row["successes_last"]],
                 [row["successes"], row["count"] - row["successes"]]]
        side = "greater" if row["worse_when"] == WORSE_WHEN_LOWER else "less"
        p_value = fisher_exact(table, alternative=side).pvalue
        return bool(p_value < level), f"Fisher exact one-sided p = {p_value:.2g} (threshold {level:.2g})"
    if row["figure"] != "images_per_s":
        return False, ""
    if pd.isna(row["value"]) or pd.isna(row["value_last"]):
        night = "tonight" if pd.isna(row["value"]) else "the earlier night"
        return False, f"not compared: {night} certified no images (all reused), so no throughput was measured"
    drop = 1 - row["value"] / row["value_last"] if row["value_last"] else 0.0
    return bool(drop > throughput_tolerance), f"throughput {drop:+.1%} lower (tolerance {throughput_tolerance:.0%})"
