"""Short names for settings, for legends and tables.

A setting string (`Certifier.setting`, e.g. 'cohen(sigma=0.25, alpha=0.001, n0=100, n=2000, mode=certify)')
names every setting of a certifier. Beside other settings it is told apart by a few of them: `short_labels`
names each by its certifier, a mode other than `certify` (e.g. `cohen sequential`), its sigma, and the main
settings whose values differ between the settings of that certifier shown together, e.g.
`cohen sigma=0.25 n=2000` beside `cohen sigma=0.25 n=20000`; minor settings are added only where the main
ones leave two settings with one name. The names are unique among the settings given; the full setting
stays in the legend table beside each name.

Names only: what a setting is (its norm, kind, largest radius, target radii) is read from the columns its
certifier recorded in the rows (`pipeline.results`), never parsed from the setting string.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["parse_setting", "short_labels"]

# Settings that say what a certificate is, in the order names show them; the rest tell apart only if needed.
MAIN = ("k", "n", "n0", "alpha", "eps_in", "output", "metric", "centers", "reduce", "num_patches", "noise", "q",
        "template", "bound", "placement", "patch_size", "resize_to")
ALWAYS = {"topk": ("k",), "center": ("eps_in",)}  # shown even when no other setting of the certifier differs
_ITEM = re.compile(r",\s*(?=[A-Za-z_]\w*=)")


def parse_setting(setting: str) -> tuple[str, dict[str, str]]:
    """'name(key=value, ...)' -> (name, {key: value text}), for naming; values may hold commas, as
    `radii=(0.0, 0.5)` does. A string of another shape is its own name, with no settings."""
    match = re.fullmatch(r"\s*([A-Za-z_]\w*)\((.*)\)\s*", setting, flags=re.DOTALL)
    if not match:
        return setting, {}
    items = {}
    for item in _ITEM.split(match.group(2)) if match.group(2).strip() else []:
        key, _, value = item.partition("=")
        items[key.strip()] = value.strip()
    return match.group(1), items


def short_labels(settings: Iterable[str]) -> dict[str, str]:
    """Setting -> short name, unique among `settings` (see the module docstring)."""
    settings = sorted(set(settings))
    parsed = {setting: parse_setting(setting) for setting in settings}
    by_name: dict[str, list[str]] = {}
    for setting, (name, _) in parsed.items():
        by_name.setdefault(name, []).append(setting)
    labels = {}
    for name, group in by_name.items():
        labels.update(_group_labels(name, {setting: parsed[setting][1] for setting in group}))
    return labels


def _group_labels(name: str, group: dict[str, dict[str, str]]) -> dict[str, str]:
    """Names for the settings of one certifier: the main settings that differ, then minor ones while two
    names are equal, then a number."""
    differing = [key for key in _keys(group.values()) if len({items.get(key) for items in group.values()}) > 1]
    shown = [key for key in ALWAYS.get(name, ()) if key not in differing]
    shown += [key for key in MAIN if key in differing]
    labels = {setting: _label(name, items, shown) for setting, items in group.items()}
    for key in differing:
        if len(set(labels.values())) == len(labels):
            break
        if key not in shown and key != "mode":
            shown.append(key)
            labels = {setting: _label(name, items, shown) for setting, items in group.items()}
    if len(set(labels.values())) < len(labels):
        labels = {setting: f"{label} #{number}" for number, (setting, label) in enumerate(sorted(labels.items()), 1)}
    return labels


def _keys(groups: Iterable[dict[str, str]]) -> list[str]:
    seen: dict[str, None] = {}
    for items in groups:
        seen.update(dict.fromkeys(items))
    return list(seen)


def _label(name: str, items: dict[str, str], shown: list[str]) -> str:
    words = [name]
    if items.get("mode", "certify") != "certify":
        words.append(items["mode"])
    if "sigma" in items:
        words.append(f"sigma={items['sigma']}")
    words += [f"{key}={items[key]}" for key in shown if key in items and key not in ("sigma", "mode")]
    return " ".join(words)
