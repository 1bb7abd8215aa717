"""Comparing a run with other runs and with published logs.

A source is a run (a directory or s3:// URI holding `results/`) or a log of the authors' reference code
(locuslab's certify.py TSV, `idx label predict radius correct time`), read by
`pipeline.results.read_certify_log`. A log does not say its noise level: give it as `PATH,sigma=0.5`
(also `n=`, `n0=`, `alpha=`; the defaults are the papers' 100000, 100 and 0.001), or let a `sigma0.50` in
the file name say it. `label=NAME` names any source in tables and legends.

`differences(a, b)` pairs the settings of two sources (the same full setting; else the same certifier, norm,
mode and sigma as the rows record them, when that pairs them one to one) and gives, per pair and radius,
certified accuracy in each and the difference b - a with a `confidence` interval and a p-value, as sampling
over the images allows: Newcombe's hybrid score interval (from the two Wilson intervals) and Fisher's exact
two-sided test, both for two independent binomial proportions; ACR's difference gets Welch's t interval and
test (`scipy.stats.ttest_ind` with unequal variances). Two runs over the same images have positively
correlated outcomes, so for them the intervals are wider than needed, never narrower. The uncertainty of each
certificate itself (its alpha) is not in these intervals; it is in the report's Theorem 6 bounds.

Nothing is left out silently: `unpaired` names the settings of each source without a partner (and those
without labeled rows), `shared_images` warns when the sources hold different images (none shared: other
datasets; only some), and an interval that is not defined (ACR over a single image) is shown as n/a with
the reason. A results file that is not result rows is named (`pipeline.results.ResultsUnreadable`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from scipy import stats as scipy_stats

from pipeline.report import (
    Source,
    acr,
    certified_counts,
    certified_radius,
    combined_rows,
    recorded_targets,
    table_radii,
)
from pipeline.results import read_certify_log, read_results
from pipeline.storage import Storage

__all__ = ["differences", "format_differences", "load_source", "newcombe_interval", "shared_images", "unpaired"]

LOG_OPTIONS = {"sigma": float, "n": int, "n0": int, "alpha": float, "label": str}


def _options(spec: str) -> tuple[str, dict]:
    """'PATH,key=value,...' -> (PATH, options); keys from LOG_OPTIONS, values converted."""
    path, *items = spec.split(",")
    options = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator or key.strip() not in LOG_OPTIONS:
            raise ValueError(f"{spec}: cannot read {item!r}; give options as key=value with keys "
                             f"{', '.join(LOG_OPTIONS)}")
        try:
            options[key.strip()] = LOG_OPTIONS[key.strip()](value.strip())
        except ValueError as error:
            raise ValueError(f"{spec}: {key.strip()}={value.strip()!r} is not a valid value") from error
    return path, options


def load_source(spec: str, storage: Storage | None = None) -> Source:
    """The source a command-line argument names: a local log file, or a run directory / URI."""
    path, options = _options(spec)
    if Path(path).is_file():
        sigma = options.get("sigma")
        if sigma is None:
            match = re.search(r"sigma[_=-]?(\d+(?:\.\d+)?)", Path(path).name)
            if not match:
                raise ValueError(f"{path}: a certify log does not record its noise level; give it as "
                                 f"{path},sigma=SIGMA")
            sigma = float(match.group(1))
        table = read_certify_log(path, sigma=sigma, alpha=options.get("alpha", 0.001), n=options.get("n", 100_000),
                                 n0=options.get("n0", 100))
        return Source(options.get("label", Path(path).stem), table, origin=str(path), log=True)
    run = (storage or Storage()).open(path)
    table = read_results(run.join("results"))
    if table.num_rows == 0:
        raise ValueError(f"{path}: neither a certify log file nor a run with results under {run.uri}/results")
    return Source(options.get("label", run.uri.rstrip("/").rsplit("/", 1)[-1]), table, origin=run.uri)


def newcombe_interval(successes_a: int, n_a: int, successes_b: int, n_b: int,
                      confidence: float = 0.95) -> tuple[float, float]:
    """Newcombe's hybrid score interval for p_b - p_a from two independent binomial samples (his method 10),
    built from the Wilson score interval of each proportion."""
    low_a, high_a = scipy_stats.binomtest(successes_a, n_a).proportion_ci(confidence, method="wilson")
    low_b, high_b = scipy_stats.binomtest(successes_b, n_b).proportion_ci(confidence, method="wilson")
    p_a, p_b = successes_a / n_a, successes_b / n_b
    difference = p_b - p_a
    return (difference - math.hypot(p_b - low_b, high_a - p_a), difference + math.hypot(high_b - p_b, p_a - low_a))


def _pairs(rows: pd.DataFrame) -> tuple[list[tuple[str, str]], list[list[str]]]:
    """(setting in a, setting in b) pairs: equal settings, then one-to-one matches on certifier, norm, mode
    and sigma among the rest (the columns of their rows; mode from the recorded params); and the settings of
    each side left without a partner."""
    settings = [set(rows.loc[rows["order"] == order, "setting"]) for order in (0, 1)]
    pairs = [(setting, setting) for setting in sorted(settings[0] & settings[1])]

    def key(setting: str) -> tuple:
        row = rows.loc[rows["setting"] == setting].iloc[0]
        mode = json.loads(row["params"]).get("mode", "certify")
        return row["certifier"], row["norm"], mode, float(row["sigma"])

    rest = [{} for _ in (0, 1)]
    for side in (0, 1):
        for setting in sorted(settings[side] - settings[1 - side]):
            rest[side].setdefault(key(setting), []).append(setting)
    pairs += [(rest[0][k][0], rest[1][k][0]) for k in sorted(rest[0], key=str)
              if len(rest[0][k]) == 1 and len(rest[1].get(k, [])) == 1]
    paired = [{pair[side] for pair in pairs} for side in (0, 1)]
    return pairs, [sorted(settings[side] - paired[side]) for side in (0, 1)]


def differences(a: Source, b: Source, radii: Sequence[float] | None = None, confidence: float = 0.95) -> pd.DataFrame:
    """Per paired setting and radius (then ACR): both values, b - a, its interval and p-value (see the module
    docstring), and a `note` where the interval or p-value is not defined (n/a) and why. Labeled rows only; a
    sequential setting at its target radii only. What is not paired: `unpaired`."""
    rows = combined_rows([a, b])
    rows = rows[rows["correct"].notna()]
    records = []
    for setting_a, setting_b in _pairs(rows)[0]:
        group_a = rows[(rows["order"] == 0) & (rows["setting"] == setting_a)]
        group_b = rows[(rows["order"] == 1) & (rows["setting"] == setting_b)]
        name = group_a["name"].iloc[0] + ("" if setting_a == setting_b else f" ~ {group_b['name'].iloc[0]}")
        norm = group_a["norm"].iloc[0]
        targets = [t for group in (group_a, group_b) for t in recorded_targets(group) or ()]
        norm_radii = [r for r in table_radii(rows, norm, radii) if not targets or any(math.isclose(r, t)
                                                                                    for t in targets)]
        records += _accuracy_records(name, norm, group_a, group_b, norm_radii, confidence)
        if not targets:
            records.append(_acr_record(name, norm, group_a, group_b, confidence))
    return pd.DataFrame(records, columns=["setting", "norm", "figure", "a", "b", "difference", "low", "high",
                                          "p_value", "images_a", "images_b", "note"])


def unpaired(a: Source, b: Source) -> list[str]:
    """Lines naming what `differences` leaves out: the settings of each source without a partner in the other,
    and settings without labeled rows (output certificates, unlabeled images)."""
    rows = combined_rows([a, b])
    labeled = rows["correct"].notna()
    lines = []
    for side, names in enumerate(_pairs(rows[labeled])[1]):
        shown = sorted(set(rows.loc[(rows["order"] == side) & rows["setting"].isin(names), "name"]))
        if shown:
            lines.append(f"only in {(a, b)[side].label}: {'; '.join(shown)} (no setting of "
                         f"{(b, a)[side].label} pairs with it; not compared)")
    unlabeled = sorted(set(rows.loc[~rows["setting"].isin(set(rows.loc[labeled, "setting"])), "name"]))
    if unlabeled:
        lines.append(f"without labeled rows (output certificates or unlabeled images): {'; '.join(unlabeled)} "
                     f"(not compared)")
    return lines


def shared_images(a: Source, b: Source) -> str | None:
    """A warning when the sources do not hold the same images: none shared (different datasets?) or only some;
    None when their images are the same. Images are matched by image_id, or by dataset index where one of
    them is a published log."""
    column = "image_index" if a.log or b.log else "image_id"
    ids = [set(source.table[column].to_pylist()) for source in (a, b)]
    shared = len(ids[0] & ids[1])
    if ids[0] == ids[1]:
        return None
    what = f"{a.label} ({_images(len(ids[0]))}) and {b.label} ({_images(len(ids[1]))})"
    if not shared:
        return (f"warning: {what} share no image ({column}): they were certified on different images, perhaps "
                f"different datasets, so each difference mixes the images' difficulty with the settings'")
    return f"warning: {what} share only {_images(shared)} ({column}); the others are in one of them only"


def _images(count: int) -> str:
    return f"{count} image{'' if count == 1 else 's'}"


def _accuracy_records(name, norm, group_a, group_b, radii, confidence) -> list[dict]:
    records = []
    n_a, n_b = len(group_a), len(group_b)
    for radius, k_a, k_b in zip(radii, certified_counts(group_a, radii), certified_counts(group_b, radii),
                                strict=True):
        low, high = newcombe_interval(k_a, n_a, k_b, n_b, confidence)
        p_value = scipy_stats.fisher_exact([[k_a, n_a - k_a], [k_b, n_b - k_b]]).pvalue
        records.append({"setting": name, "norm": norm, "figure": f"r={radius:g}", "a": k_a / n_a, "b": k_b / n_b,
                        "difference": k_b / n_b - k_a / n_a, "low": low, "high": high, "p_value": float(p_value),
                        "images_a": n_a, "images_b": n_b, "note": ""})
    return records


def _acr_record(name, norm, group_a, group_b, confidence) -> dict:
    """ACR in both and its difference b - a with Welch's t interval and two-sided p-value. Where neither side
    varies (every term equal, as when all abstain) the difference is exact: the interval is that point and the
    p-value 1 when it is 0 (else n/a). With fewer than 2 images on a side there is no variance to estimate: the
    interval and p-value are n/a, and `note` says why."""
    terms_a, terms_b = certified_radius(group_a).to_numpy(), certified_radius(group_b).to_numpy()
    difference = acr(group_b) - acr(group_a)
    note = ""
    if min(len(terms_a), len(terms_b)) < 2:
        low = high = p_value = math.nan
        note = (f"n/a: Welch's t needs 2 or more images on each side ({len(terms_a)} vs {len(terms_b)})")
    elif terms_a.var() == 0 and terms_b.var() == 0:
        low = high = difference
        p_value = 1.0 if difference == 0 else math.nan
        note = "" if difference == 0 else "p n/a: neither side varies, the difference is exact"
    else:
        welch = scipy_stats.ttest_ind(terms_b, terms_a, equal_var=False)
        low, high = welch.confidence_interval(confidence)
        p_value = welch.pvalue
    return {"setting": name, "norm": norm, "figure": "ACR", "a": acr(group_a), "b": acr(group_b),
            "difference": difference, "low": float(low), "high": float(high), "p_value": float(p_value),
            "images_a": len(terms_a), "images_b": len(terms_b), "note": note}


def format_differences(frame: pd.DataFrame, a: Source, b: Source, confidence: float = 0.95) -> str:
    """The differences as text: a warning when the sources hold different images, a table per norm, a line
    saying what the intervals are, and what was not compared (settings without a partner, n/a intervals)."""
    notes = [line for line in (shared_images(a, b),) if line] + unpaired(a, b)
    if frame.empty:
        return "\n".join([*notes, f"no setting of {a.label} pairs with one of {b.label}"])
    lines = [*notes, f"{b.label} - {a.label}: certified accuracy (and ACR) per setting, with {confidence:.0%} "
             f"intervals (accuracy: Newcombe hybrid score; ACR: Welch t) and two-sided p-values (accuracy: "
             f"Fisher exact)"]
    for norm, group in frame.groupby("norm", sort=True):
        shown = pd.DataFrame({
            "setting": group["setting"], "radius": group["figure"], a.label: group["a"].map(lambda v: f"{v:.3f}"),
            b.label: group["b"].map(lambda v: f"{v:.3f}"),
            "difference": group["difference"].map(lambda v: f"{v:+.3f}"),
            "interval": [f"[{low:+.3f}, {high:+.3f}]" if not (math.isnan(low) or math.isnan(high)) else "n/a"
                         for low, high in zip(group["low"], group["high"], strict=True)],
            "p": group["p_value"].map(lambda v: "n/a" if math.isnan(v) else f"{v:.2g}")})
        lines += ["", f"{norm} ({int(group['images_a'].max())} vs {int(group['images_b'].max())} images):",
                  shown.to_markdown(index=False, disable_numparse=True)]
        lines += [f"{row['setting']} {row['figure']}: {row['note']}" for _, row in group.iterrows() if row["note"]]
    return "\n".join(lines)
