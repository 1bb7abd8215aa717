"""Certified-accuracy figures, tables and plots, from result rows alone.

Certified accuracy at radius r (Cohen et al.'s "approximate certified accuracy") is the fraction of
labeled images whose certificate is correct with radius >= r; abstentions and error rows count as
failures. Beside it: the average certified radius (ACR, radius times correctness, averaged), the
abstention rate, and the Theorem 6 lower bound on the true certified accuracy at confidence 1 - rho.
Output certifiers (center smoothing) certify outputs, not classes; their rows are the ones without a
prediction, and get the median eps_out and the median smoothing error over the images not abstained on,
as Kumar & Goldstein report them.

`certified_correct`, `accuracy_at`, `certified_counts` and `acr` are the one definition of these figures;
the nightly benchmark and the sweep's objective use them too.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.figure import Figure

from pipeline import stats
from pipeline.storage import Location

DEFAULT_RADII = {"l2": (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0), "l1": (0.0, 0.25, 0.5, 0.75, 1.0, 2.0, 3.0, 4.0)}
RHO = 0.001

__all__ = ["accuracy_at", "acr", "certified_accuracy", "certified_correct", "certified_counts", "certified_radius",
           "plot_curves", "summary", "write_report"]


def certified_correct(rows: pd.DataFrame) -> pd.Series:
    """Per row: the certificate was issued (status 'ok') and is about the true label (`correct`). False for
    abstentions, error rows and rows without a `correct` value."""
    return rows["correct"].fillna(False).astype(bool) & (rows["status"] == "ok")


def certified_counts(rows: pd.DataFrame, radii: Sequence[float]) -> list[int]:
    """For each radius r, how many rows are certified correct with radius >= r."""
    certified = rows["radius"].to_numpy()[certified_correct(rows).to_numpy()]
    return [int((certified >= r).sum()) for r in radii]


def accuracy_at(rows: pd.DataFrame, radii: Sequence[float]) -> list[float]:
    """Certified accuracy at each radius r: the fraction of `rows` certified correct with radius >= r
    (NaN when there are no rows)."""
    if len(rows) == 0:
        return [float("nan")] * len(radii)
    return [count / len(rows) for count in certified_counts(rows, radii)]


def certified_radius(rows: pd.DataFrame) -> pd.Series:
    """Per row: its radius when certified correct, else 0 (the terms ACR averages)."""
    return rows["radius"] * certified_correct(rows)


def acr(rows: pd.DataFrame) -> float:
    """Average certified radius over `rows`: the radius where certified correct, 0 elsewhere, averaged."""
    return float(certified_radius(rows).mean())


def _classified(table: pa.Table) -> pa.Table:
    """The rows that carry a `correct` value: classifying certifiers on labeled images."""
    return table.filter(pc.invert(pc.is_null(table["correct"])))


def _labeled(table: pa.Table) -> pd.DataFrame:
    """`_classified` rows as a data frame."""
    return _classified(table).to_pandas()


def certified_accuracy(table: pa.Table, radii: Sequence[float]) -> pd.DataFrame:
    """Certified accuracy at each radius, one row per setting (index: setting, norm)."""
    rows = _labeled(table)
    out = {}
    for key, group in rows.groupby(["setting", "norm"], sort=True):
        out[key] = dict(zip([f"r={r:g}" for r in radii], accuracy_at(group, radii), strict=True))
    frame = pd.DataFrame.from_dict(out, orient="index")
    frame.index.names = ["setting", "norm"]
    return frame


def _overview(table: pa.Table) -> pd.DataFrame:
    rows = table.to_pandas()
    labeled = _labeled(table)
    overview = rows.groupby(["setting", "norm"], sort=True).agg(
        images=("image_id", "nunique"), errors=("status", lambda s: int((s == "error").sum())),
        abstention_rate=("abstained", "mean"), passes_per_image=("forward_passes", "mean"),
        seconds_per_image=("wall_time_s", "mean"))
    if len(labeled):
        overview["ACR"] = certified_radius(labeled).groupby([labeled["setting"], labeled["norm"]]).mean()
    return overview


def _outputs(table: pa.Table) -> pa.Table:
    """The rows of output certifiers (center smoothing): those without a prediction."""
    return table.filter(pc.is_null(table["prediction"]))


def _center(table: pa.Table) -> pd.DataFrame:
    rows = _outputs(table).to_pandas()
    certified = rows[~rows["abstained"] & (rows["status"] == "ok")]
    frame = rows.groupby("setting", sort=True).agg(output=("output", "first"), metric=("metric", "first"),
                                                    eps_in=("eps_in", "first"), images=("image_id", "nunique"),
                                                    abstention_rate=("abstained", "mean"))
    frame["median_eps_out"] = certified.groupby("setting")["eps_out"].median()
    frame["median_smoothing_error"] = certified.groupby("setting")["smoothing_error"].median()
    return frame


def _theorem6(table: pa.Table, radii: Sequence[float]) -> pd.DataFrame:
    rows = _labeled(table)
    out = {}
    for key, group in rows.groupby(["setting", "norm"], sort=True):
        alpha = float(group["alpha"].max())
        out[key] = {f"r={r:g}": stats.certified_accuracy_lower_bound(count, len(group), alpha, RHO)
                    for r, count in zip(radii, certified_counts(group, radii), strict=True)}
    frame = pd.DataFrame.from_dict(out, orient="index")
    frame.index.names = ["setting", "norm"]
    return frame


def _markdown(frame: pd.DataFrame) -> str:
    return frame.reset_index().to_markdown(index=False, floatfmt=".3g")


def summary(table: pa.Table, radii: Sequence[float] | None = None) -> str:
    """Markdown: an overview per setting, then certified accuracy at the radii (per norm), then the
    Theorem 6 lower bounds."""
    parts = ["## Overview", "", _markdown(_overview(table))]
    if _outputs(table).num_rows:
        parts += ["", "## Center smoothing (medians over the images not abstained on)", "", _markdown(_center(table))]
    classified = _classified(table)
    for norm in sorted(set(classified["norm"].to_pylist())):
        subset = classified.filter(pc.equal(classified["norm"], norm))
        norm_radii = radii or DEFAULT_RADII.get(norm, DEFAULT_RADII["l2"])
        parts += ["", f"## Certified accuracy, {norm} radius", "", _markdown(certified_accuracy(subset, norm_radii)),
                  "", f"## Lower bound on the true certified accuracy, {norm} (Cohen et al. Theorem 6, "
                      f"confidence {1 - RHO:g})", "", _markdown(_theorem6(subset, norm_radii))]
    return "\n".join(parts)


def plot_curves(table: pa.Table, norm: str) -> bytes:
    """PNG of certified accuracy against radius, one curve per setting of the norm."""
    rows = _labeled(table.filter(pc.equal(table["norm"], norm)))
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    top = max(float(rows["radius"].max()) if len(rows) else 1.0, 1e-3) * 1.05
    grid = np.linspace(0, top, 400)
    for setting, group in rows.groupby("setting", sort=True):
        axes.plot(grid, accuracy_at(group, grid), label=setting)
    axes.set(xlabel=f"{norm} radius (pixel units)", ylabel="certified accuracy", ylim=(0, 1),
             title=f"Certified accuracy ({norm})")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower left")
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def write_report(table: pa.Table, location: Location, radii: Sequence[float] | None = None) -> str:
    """Writes summary.md, certified_accuracy.csv and one curves_<norm>.png per norm; returns the Markdown."""
    text = summary(table, radii)
    location.write_bytes("summary.md", (text + "\n").encode())
    classified = _classified(table)
    norms = sorted(set(classified["norm"].to_pylist()))
    if norms:
        frames = [certified_accuracy(classified.filter(pc.equal(classified["norm"], norm)),
                                     radii or DEFAULT_RADII.get(norm, DEFAULT_RADII["l2"])) for norm in norms]
        location.write_bytes("certified_accuracy.csv", pd.concat(frames).to_csv().encode())
        for norm in norms:
            location.write_bytes(f"curves_{norm}.png", plot_curves(classified, norm))
    return text
