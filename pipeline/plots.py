"""Figures from plain series: certified-accuracy curves and distributions, laid out to read at a glance.

Every figure keeps its axes at full width: the legend sits below them (matplotlib's constrained layout,
`loc="outside lower center"`), and the figure grows taller with the number of entries instead of squeezing
the axes. Accuracy axes start at 0 on both sides; a curve's largest certifiable radius is a triangle on the
bottom edge (the curve is 0 beyond it); the Theorem 6 lower bound is a band under the curve; a setting
certified only at target radii (sequential) is drawn as markers there, not as a curve. Same colour, same
setting; line style tells the compared sources apart.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

__all__ = ["Curve", "accuracy_figure", "accuracy_panels", "histogram_figure", "objective_figure", "to_png"]

STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "D", "^")
WIDTH = 7.5


@dataclass(frozen=True)
class Curve:
    """One setting's certified accuracy `y` at radii `x`: a line (with `marker` at each x, if given), or
    markers only (`points`); `lower` the Theorem 6 lower bound at x; `limit` its largest certifiable radius;
    `color` a key (same key, same colour); `source` 0 for the run itself, 1, 2, ... for compared sources."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    lower: Sequence[float] | None = None
    points: bool = False
    limit: float | None = None
    color: str | None = None
    source: int = 0
    marker: str | None = None


def _colors(curves: Sequence[Curve]) -> dict[str, str]:
    keys = list(dict.fromkeys(curve.color or curve.label for curve in curves))
    return {key: f"C{number % 10}" for number, key in enumerate(keys)}


def _legend_height(entries: int, columns: int) -> float:
    return 0.22 * math.ceil(entries / columns) + 0.3


def _draw(axes, curve: Curve, color: str) -> None:
    x, y = np.asarray(curve.x, float), np.asarray(curve.y, float)
    style = STYLES[curve.source % len(STYLES)]
    if curve.points:
        axes.plot(x, y, linestyle="none", marker=MARKERS[curve.source % len(MARKERS)], markersize=7, color=color,
                  label=curve.label, zorder=3, clip_on=False)
        if curve.lower is not None:
            axes.vlines(x, np.asarray(curve.lower, float), y, color=color, alpha=0.5, linewidth=3)
    else:
        zero = np.flatnonzero(y <= 0)
        if zero.size and zero[0] + 1 < len(x):  # stop where the curve reaches 0: it stays there
            x, y = x[:zero[0] + 1], y[:zero[0] + 1]
            lower = None if curve.lower is None else np.asarray(curve.lower, float)[:zero[0] + 1]
            curve = dataclasses.replace(curve, lower=lower)
        axes.plot(x, y, linestyle=style, color=color, label=curve.label, linewidth=1.6, marker=curve.marker,
                  clip_on=curve.marker is None)
        if curve.lower is not None:
            axes.fill_between(x, np.asarray(curve.lower, float), y, color=color, alpha=0.1, linewidth=0)
    if curve.limit is not None and math.isfinite(curve.limit):
        axes.plot([curve.limit], [0.0], marker="^", markersize=9, color=color, clip_on=False, linestyle="none",
                  markeredgecolor="white", zorder=4)


def accuracy_figure(curves: Sequence[Curve], xlabel: str, title: str, rho: float | None = None) -> Figure:
    """Certified accuracy against radius, one entry per curve in a legend below the axes; `rho`: the
    confidence 1 - rho of the lower-bound bands, named in the legend when any curve has one."""
    return accuracy_panels([(curves, xlabel, title)], rho)


def accuracy_panels(panels: Sequence[tuple[Sequence[Curve], str, str]], rho: float | None = None) -> Figure:
    """One panel per (curves, xlabel, title), stacked, each at the figure's full width with its legend below
    it (see `accuracy_figure`)."""
    heights = [4.2 + _legend_height(len(curves) + len(_notes(curves, rho)), _columns(curves))
               for curves, _, _ in panels]
    figure = Figure(figsize=(WIDTH, sum(heights)), layout="constrained")
    parts = [figure] if len(panels) == 1 else figure.subfigures(len(panels), 1, height_ratios=heights)
    colors = _colors([curve for curves, _, _ in panels for curve in curves])
    for part, (curves, xlabel, title) in zip(parts, panels, strict=True):
        axes = part.subplots()
        for curve in curves:
            _draw(axes, curve, colors[curve.color or curve.label])
        right = [float(np.max(curve.x)) * (1.1 if curve.points or curve.marker else 1.0)
                 for curve in curves if len(curve.x)]
        right += [curve.limit * 1.05 for curve in curves if curve.limit is not None and math.isfinite(curve.limit)]
        axes.set(xlim=(0, max([*right, 1e-3])), ylim=(0, 1.02), xlabel=xlabel, ylabel="certified accuracy",
                 title=title, yticks=np.linspace(0, 1, 6))
        axes.grid(alpha=0.3)
        lines, labels = axes.get_legend_handles_labels()
        handles = _notes(curves, rho)
        if lines:
            part.legend(lines + handles, labels + [h.get_label() for h in handles], loc="outside lower center",
                        ncols=_columns(curves), fontsize=8, frameon=False)
    return figure


def _columns(curves: Sequence[Curve]) -> int:
    return 1 if max([len(curve.label) for curve in curves] + [0]) > 40 else 2


def _notes(curves: Sequence[Curve], rho: float | None) -> list:
    """Legend entries that explain the marks: the lower-bound band, the certifiable maximum, target radii."""
    notes = []
    if rho is not None and any(curve.lower is not None for curve in curves):
        notes.append(Patch(color="0.6", alpha=0.35, label=f"band: Theorem 6 lower bound, confidence {1 - rho:g}"))
    if any(curve.limit is not None for curve in curves):
        notes.append(Line2D([], [], color="0.4", marker="^", linestyle="none", label="largest certifiable radius"))
    if any(curve.points for curve in curves):
        notes.append(Line2D([], [], color="0.4", marker="o", linestyle="none",
                            label="markers: certified at its target radii only"))
    return notes


def histogram_figure(samples: dict[str, Sequence[float]], xlabel: str, title: str) -> Figure:
    """One histogram per label (step outlines on shared bins), the legend below the axes."""
    columns = 1 if max([len(label) for label in samples] + [0]) > 40 else 2
    figure = Figure(figsize=(WIDTH, 3.6 + _legend_height(len(samples), columns)), layout="constrained")
    axes = figure.subplots()
    values = [np.asarray(v, float)[np.isfinite(np.asarray(v, float))] for v in samples.values()]
    pooled = np.concatenate(values) if values else np.array([])
    bins = np.histogram_bin_edges(pooled, bins=30) if pooled.size else 10
    for number, (label, data) in enumerate(zip(samples, values, strict=True)):
        if data.size:
            axes.hist(data, bins=bins, histtype="step", linewidth=1.6, color=f"C{number % 10}",
                      label=f"{label} (median {np.median(data):.3g})")
    axes.set(xlabel=xlabel, ylabel="images", title=title)
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        figure.legend(loc="outside lower center", ncols=columns, fontsize=8, frameon=False)
    return figure


def objective_figure(values: dict[str, Sequence[float]], objective: Sequence[float], stopped: Sequence[bool],
                     metric: str, log_scale: Sequence[str] = ()) -> Figure:
    """A sweep's objective against each searched value (one panel per key, side by side, the legend below):
    trials that ran every epoch in blue, those the scheduler stopped early in red, the best one starred.
    Keys in `log_scale`, and keys whose positive values span more than two decades, get a log axis."""
    keys = list(values)
    figure = Figure(figsize=(max(WIDTH, 4.0 * len(keys)), 4.2), layout="constrained")
    objective, stopped = np.asarray(objective, float), np.asarray(stopped, bool)
    best = int(np.nanargmax(objective)) if np.isfinite(objective).any() else None
    for axes, key in zip(figure.subplots(1, len(keys), squeeze=False)[0], keys, strict=True):
        x = np.asarray(values[key], float)
        for mask, color, label in ((~stopped, "C0", "ran every epoch"), (stopped, "C3", "stopped early")):
            axes.scatter(x[mask], objective[mask], color=color, label=label, zorder=3)
        if best is not None:
            axes.scatter([x[best]], [objective[best]], marker="*", s=220, facecolor="none", edgecolor="k",
                         label="best", zorder=4)
        positive = x[np.isfinite(x) & (x > 0)]
        if key in log_scale or (positive.size == np.isfinite(x).sum() > 1 and positive.max() / positive.min() > 100):
            axes.set_xscale("log")
        axes.set(xlabel=key, ylabel=metric, title=f"{metric} vs {key} ({len(objective)} trials)")
        axes.grid(alpha=0.3)
    handles, labels = figure.axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    return figure


def to_png(figure: Figure, dpi: int = 120) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
