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

Only like is compared with like. Figures are matched on (model, setting, figure), and each figure records
what identifies its model's entry (`IDENTITY`: the model section, the sha256 of the loaded model's state
dict, and the run settings that change results: dataset, seed, precision, channels_last, compile). When an
entry changed (a new label, other weights under the same label, a certifier parameter, which changes the
setting string), its figures are `changed`: listed with what differs or which night lacks them, never a
regression and never "no regression"; the figures that still match are compared. Nights written before the
identity was recorded are matched on the label alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import pandas as pd
import pyarrow as pa
from scipy.stats import fisher_exact

from pipeline.report import acr, certified_counts, recorded_targets

__all__ = ["IDENTITY", "THROUGHPUT_FIGURES", "changed_entries", "compare", "figures", "is_reused", "not_compared"]

WORSE_WHEN_LOWER = "lower"
WORSE_WHEN_HIGHER = "higher"
THROUGHPUT_FIGURES = ("images_per_s", "device_seconds_per_image", "cost_per_image")
COLUMNS = ["setting", "norm", "targets", "figure", "value", "successes", "count", "kind", "worse_when"]
KEYS = ["model", "setting", "figure"]
# what identifies a model's entry of the suite, recorded in each of its figures (JSON texts and a digest)
IDENTITY = ("model_spec", "model_sha256", "run_spec")


def figures(model: str, results: pa.Table, radii: Sequence[float], seconds: float, devices: int,
            price_per_device_hour: float, certified_tonight: int, identity: dict | None = None) -> pd.DataFrame:
    """One row per figure: model, setting, its norm and target radii, figure, value, successes and count (for
    proportions), kind, and the model entry's `identity` (the `IDENTITY` keys; null where not given).
    Accuracy and abstention come from all of `results`; throughput from the `certified_tonight` images that
    tonight's attempt certified in `seconds` on `devices` devices (NaN when it certified none)."""
    rows = results.to_pandas()
    rows = rows.assign(**{column: None for column in ("norm", "targets") if column not in rows})
    out = [row for setting, group in rows.groupby("setting", sort=True) for row in _setting_figures(
        setting, group, radii)]
    out += _throughput_figures(certified_tonight, seconds, devices, price_per_device_hour)
    frame = pd.DataFrame(out, columns=COLUMNS)
    frame.insert(0, "model", model)
    return frame.assign(**{key: (identity or {}).get(key) for key in IDENTITY})


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
    """Every figure of either night, matched on (model, setting, figure): both values, `regression` (bool),
    `changed` (bool: not compared because the suite changed) and `reason`. Only like is compared with like:
    the figures of a model whose entry changed (`IDENTITY`, where both nights recorded it), a figure found on
    one night only, and the throughput of a model whose settings changed are `changed`, never a regression;
    their reason names what differs or which night lacks it."""
    both = tonight.merge(last, on=KEYS, suffixes=("", "_last"), how="outer", indicator=True)
    for column in ("kind", "worse_when"):
        both[column] = both[column].fillna(both[f"{column}_last"])
    entries = changed_entries(tonight, last)
    resettled = _resettled(tonight, last)
    unmatched = [_unmatched(row, entries, resettled, tonight, last) for _, row in both.iterrows()]
    both["changed"] = [reason is not None for reason in unmatched]
    level = alpha / max(1, int(((both["kind"] == "proportion") & ~both["changed"]).sum()))
    tests = [(False, reason) if reason is not None else _test(row, level, throughput_tolerance)
             for reason, (_, row) in zip(unmatched, both.iterrows(), strict=True)]
    both["regression"] = [flagged for flagged, _ in tests]
    both["reason"] = [reason for _, reason in tests]
    return both[[*KEYS, "value_last", "value", "regression", "changed", "reason"]].reset_index(drop=True)


def not_compared(comparison: pd.DataFrame) -> list[str]:
    """The reasons of the figures not compared because the suite changed, each once, in table order."""
    return list(dict.fromkeys(comparison.loc[comparison["changed"], "reason"]))


def _recorded(night: pd.DataFrame, model: str, key: str):
    """What a night recorded under `key` for `model` (None where it recorded nothing: an older night)."""
    if key not in night:
        return None
    values = night.loc[night["model"] == model, key].dropna()
    return values.iloc[0] if len(values) else None


def changed_entries(tonight: pd.DataFrame, last: pd.DataFrame) -> dict[str, str]:
    """Model label -> what changed in its entry (model section, weights, run settings), for the models of
    both nights whose recorded identity differs."""
    out = {}
    for model in sorted(set(tonight["model"]) & set(last["model"])):
        differences = []
        for key in IDENTITY:
            now, before = _recorded(tonight, model, key), _recorded(last, model, key)
            if now is not None and before is not None and now != before:
                differences.append(_difference(key, before, now))
        if differences:
            out[model] = "; ".join(differences)
    return out


def _difference(key: str, before: str, now: str) -> str:
    """One identity key's change in words: the weights' digests, or the section keys whose values differ."""
    if key == "model_sha256":
        return f"weights {before[:12]} -> {now[:12]} (sha256 of the state dict)"
    section = "model" if key == "model_spec" else "run"
    old, new = json.loads(before), json.loads(now)
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{section}.{k}: {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}" for k in keys)


def _resettled(tonight: pd.DataFrame, last: pd.DataFrame) -> set[str]:
    """Models of both nights whose set of settings differs (their throughput measures other work)."""
    def settings(night: pd.DataFrame, model: str) -> set[str]:
        return set(night.loc[(night["model"] == model) & (night["setting"] != "all"), "setting"])

    return {model for model in set(tonight["model"]) & set(last["model"])
            if settings(tonight, model) != settings(last, model)}


def _unmatched(row: pd.Series, entries: dict[str, str], resettled: set[str], tonight: pd.DataFrame,
               last: pd.DataFrame) -> str | None:
    """Why a matched-up figure is not comparable (the suite changed), or None when it is."""
    model, setting, figure = row["model"], row["setting"], row["figure"]
    if model in entries:
        return f"not compared: the entry of {model} changed: {entries[model]}"
    if row["_merge"] != "both":
        night, other = ("tonight", last) if row["_merge"] == "left_only" else ("the earlier night", tonight)
        if model not in set(other["model"]):
            return f"not compared: model {model} is only in the suite of {night}"
        if setting not in set(other.loc[other["model"] == model, "setting"]):
            return f"not compared: {model} {setting} is only in the suite of {night}"
        return f"not compared: {figure} of {model} {setting} is only in the suite of {night}"
    if model in resettled and figure in THROUGHPUT_FIGURES:
        return f"not compared: the settings of {model} changed, so its throughput measures other work"
    return None


def _test(row: pd.Series, level: float, throughput_tolerance: float) -> tuple[bool, str]:
    """Whether one figure regressed, and why (empty reason for figures that are only reported)."""
    if row["kind"] == "proportion":
        last, now = (int(row["successes_last"]), int(row["count_last"])), (int(row["successes"]), int(row["count"]))
        table = [[last[0], last[1] - last[0]], [now[0], now[1] - now[0]]]
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
