"""Certified-accuracy figures, tables, plots and the run's report, from result rows alone.

Certified accuracy at radius r (Cohen et al.'s "approximate certified accuracy") is the fraction of
labeled images whose certificate is correct with radius >= r; abstentions and error rows count as
failures. Beside it: the average certified radius (ACR, radius times correctness, averaged), the
abstention rate, and the Theorem 6 lower bound on the true certified accuracy at confidence 1 - rho.
Output certifiers (center smoothing) certify outputs, not classes; their rows are those of `kind`
'output', and get the distribution of eps_out and the median smoothing error over the images not
abstained on, as Kumar & Goldstein report them.

What a setting is comes from the columns its certifier recorded, never from its setting string: a setting
with `targets` (mode=sequential) decides only those radii, so its accuracy is reported at them and nowhere
else (no ACR, no curve); `max_radius` is the largest radius it can certify (the certificate when every draw
votes for one class), marked on the curves and bounding the tables' radii. Rows written before these columns
existed read them as null: every radius, no marker. A norm's tables use `DEFAULT_RADII` where it has them,
else a grid of round radii up to the largest radius its settings reach.

Tables and plots name settings by short names (`pipeline.labels`); the legend table maps each to its full
setting, its noise and what its radius covers (`COVERS_NOTE` says it in a sentence in every report). Other
sources (runs, or published logs read by `pipeline.results.read_certify_log`) can be reported beside the run
(`Source`): they share the tables and the axes.

`certified_correct`, `accuracy_at`, `certified_counts` and `acr` are the one definition of these figures;
the nightly benchmark and the sweep's objective use them too.
"""

from __future__ import annotations

import html
import json
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.ticker import MaxNLocator

from pipeline import html_page, plots, stats
from pipeline.labels import short_labels
from pipeline.storage import Location

DEFAULT_RADII = {"l2": (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0), "l1": (0.0, 0.25, 0.5, 0.75, 1.0, 2.0, 3.0, 4.0)}
RHO = 0.001
OUTPUT = "output"  # the `kind` of an output certifier's rows (pipeline.certifiers.base.OUTPUT)
DECLARED = ("kind", "max_radius", "targets", "noise", "covers")  # what certifiers record about themselves

__all__ = ["Source", "accuracy_at", "accuracy_table", "acr", "brief", "certified_accuracy",
           "certified_correct", "certified_counts", "certified_radius", "combined_rows", "curves_figure",
           "legend_table", "plot_curves", "recorded_limit", "recorded_targets", "summary", "table_radii",
           "write_report"]


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


def certified_accuracy(table: pa.Table, radii: Sequence[float]) -> pd.DataFrame:
    """Certified accuracy at each radius, one row per setting (index: setting, norm), every setting at every
    radius (see `accuracy_table` for the report's view)."""
    rows = _classified(table).to_pandas()
    out = {}
    for key, group in rows.groupby(["setting", "norm"], sort=True):
        out[key] = dict(zip([f"r={r:g}" for r in radii], accuracy_at(group, radii), strict=True))
    frame = pd.DataFrame.from_dict(out, orient="index")
    frame.index.names = ["setting", "norm"]
    return frame


@dataclass(frozen=True)
class Source:
    """Rows to report, or to report beside them: a run's results, or a published log read as rows (`log`:
    its image ids are the dataset indices); `origin` says where they came from."""

    label: str
    table: pa.Table
    origin: str = ""
    log: bool = False


def combined_rows(sources: Sequence[Source]) -> pd.DataFrame:
    """Every source's rows in one frame, with `source`, its position `order` and the setting's short `name`
    (named over all sources together, so one setting has one name everywhere)."""
    frames = []
    for order, source in enumerate(sources):
        frame = source.table.to_pandas()
        missing = {column: None for column in DECLARED if column not in frame}  # rows of other tables
        frames.append(frame.assign(source=source.label, order=order, **missing))
    rows = pd.concat(frames, ignore_index=True)
    return rows.assign(name=rows["setting"].map(short_labels(rows["setting"].unique())))


def _groups(rows: pd.DataFrame):
    """(source, name, rows) per setting of each source, sources in their order, names sorted."""
    for (_, name), group in rows.groupby(["order", "name"], sort=True):
        yield group["source"].iloc[0], name, group


def _key(source: str, name: str, several: bool):
    return (source, name) if several else name


def _index(frame: pd.DataFrame, several: bool) -> pd.DataFrame:
    if len(frame):
        frame.index = pd.MultiIndex.from_tuples(frame.index, names=["source", "setting"]) if several else frame.index
        frame.index.name = None if several else "setting"
    return frame


def recorded_limit(group: pd.DataFrame) -> float | None:
    """The setting's largest certifiable radius, as its rows recorded it (`max_radius`); None where none is."""
    recorded = group["max_radius"].dropna()
    return float(recorded.max()) if len(recorded) else None


def recorded_targets(group: pd.DataFrame) -> tuple[float, ...] | None:
    """The setting's target radii, as its rows recorded them (`targets`); None: it decides every radius."""
    recorded = [tuple(targets) for targets in group["targets"] if targets is not None and len(targets)]
    return tuple(sorted({float(t) for targets in recorded for t in targets})) or None


def _classified_rows(rows: pd.DataFrame, norm: str) -> pd.DataFrame:
    return rows[rows["correct"].notna() & (rows["norm"] == norm)]


def _reach(classified: pd.DataFrame) -> float:
    """The largest radius the settings of these rows can certify, or did certify or target."""
    groups = [group for _, _, group in _groups(classified)]
    limits = [recorded_limit(group) for group in groups]
    targets = [t for group in groups for t in recorded_targets(group) or ()]
    return max([limit for limit in limits if limit is not None] + [float(classified["radius"].max() or 0)]
               + targets)


def table_radii(rows: pd.DataFrame, norm: str, radii: Sequence[float] | None = None) -> list[float]:
    """The radii of a norm's tables: `radii` when given; else the norm's default radii (for a norm without
    defaults, round radii from 0 to the largest its settings reach) and the sequential targets, up to the
    largest radius any setting of the norm can certify (beyond it every entry is 0)."""
    if radii:
        return list(radii)
    classified = _classified_rows(rows, norm)
    reach = _reach(classified)
    default = DEFAULT_RADII.get(norm) or tuple(float(r) for r in MaxNLocator(nbins=8).tick_values(0.0, reach or 1.0))
    targets = {t for _, _, group in _groups(classified) for t in recorded_targets(group) or ()}
    return sorted({r for r in (*default, *targets) if r <= reach} | {default[0]})


def accuracy_table(rows: pd.DataFrame, norm: str, radii: Sequence[float], bound: bool = False) -> pd.DataFrame:
    """Certified accuracy at `radii` (with ACR), or with `bound` its Theorem 6 lower bound at confidence
    1 - RHO, one row per (source,) setting name; a sequential setting only at its target radii."""
    classified = _classified_rows(rows, norm)
    several = rows["source"].nunique() > 1
    out = {}
    for source, name, group in _groups(classified):
        targets = recorded_targets(group)
        counts = certified_counts(group, radii)
        alpha = float(group["alpha"].max())
        values = [stats.certified_accuracy_lower_bound(count, len(group), alpha, RHO) if bound else count / len(group)
                  for count in counts]
        if targets is not None:
            values = [v if any(math.isclose(r, t) for t in targets) else math.nan for r, v in zip(radii, values,
                                                                                                  strict=True)]
        entry = dict(zip([f"r={r:g}" for r in radii], values, strict=True))
        if not bound:
            entry["ACR"] = math.nan if targets is not None else acr(group)
        out[_key(source, name, several)] = entry
    return _index(pd.DataFrame.from_dict(out, orient="index"), several)


def _overview(rows: pd.DataFrame) -> pd.DataFrame:
    """Per setting: its norm, images, error rows, abstentions, and its cost per image."""
    several = rows["source"].nunique() > 1
    out = {}
    for source, name, group in _groups(rows):
        out[_key(source, name, several)] = {
            "norm": group["norm"].iloc[0], "images": group["image_id"].nunique(),
            "error_rows": int((group["status"] == "error").sum()), "abstention_rate": float(group["abstained"].mean()),
            "passes_per_image": float(group["forward_passes"].mean()),
            "seconds_per_image": float(group["wall_time_s"].mean())}
    return _index(pd.DataFrame.from_dict(out, orient="index"), several)


def _abstentions(rows: pd.DataFrame) -> pd.DataFrame:
    """Per setting that abstained: how often, and why where the certifier says (the reason's words before
    any ':' and figures)."""
    several = rows["source"].nunique() > 1
    out = {}
    for source, name, group in _groups(rows):
        abstained = group[group["abstained"] & (group["status"] == "ok")]
        if len(abstained):
            reasons = abstained["abstain_reason"].fillna("no certificate").str.split(":").str[0].value_counts()
            out[_key(source, name, several)] = {
                "abstained": len(abstained), "of": len(group),
                "reasons": ", ".join(f"{reason} {count}" for reason, count in reasons.items())}
    return _index(pd.DataFrame.from_dict(out, orient="index"), several)


def _errors(rows: pd.DataFrame) -> pd.DataFrame:
    """The error rows, grouped by setting and message, with a few of their image ids."""
    failed = rows[rows["status"] == "error"]
    records = [{"source": source, "setting": name, "error": str(error)[:300], "rows": len(group),
                "images": ", ".join(map(str, group["image_id"].head(3))) + (" ..." if len(group) > 3 else "")}
               for (source, name, error), group in failed.groupby(["source", "name", "error"], sort=True)]
    frame = pd.DataFrame(records, columns=["source", "setting", "error", "rows", "images"])
    return frame if rows["source"].nunique() > 1 else frame.drop(columns="source")


def _outputs(rows: pd.DataFrame) -> pd.DataFrame:
    """Per setting of an output certifier (center smoothing): what was smoothed, the eps_out distribution over
    the images not abstained on, and the median smoothing error."""
    outputs = rows[rows["kind"] == OUTPUT]
    several = rows["source"].nunique() > 1
    out = {}
    for source, name, group in _groups(outputs):
        certified = group[~group["abstained"] & (group["status"] == "ok")]
        quantiles = certified["eps_out"].quantile([0.0, 0.25, 0.5, 0.75, 1.0]).to_numpy() if len(certified) else [
            math.nan] * 5
        out[_key(source, name, several)] = {
            "output": group["output"].iloc[0], "metric": group["metric"].iloc[0], "eps_in": group["eps_in"].iloc[0],
            "images": group["image_id"].nunique(), "abstention_rate": float(group["abstained"].mean()),
            "median_eps_out": quantiles[2],
            "eps_out min / q25 / q75 / max": " / ".join(f"{quantiles[i]:.3g}" for i in (0, 1, 3, 4)),
            "median_smoothing_error": float(certified["smoothing_error"].median()) if len(certified) else math.nan}
    return _index(pd.DataFrame.from_dict(out, orient="index"), several)


COVERS_NOTE = ("What a radius covers (column `covers`): 'grid 1/255', every perturbed input on the 1/255 grid "
               "(8-bit images) within the radius, with noise drawn exactly on that grid (noise 'sound_gaussian', "
               "'dssn'), so the certificate holds for the network as floating point runs it; 'real', every real "
               "perturbed input within the radius as the theorem for real-valued noise states, which noise added "
               "in floating point (noise 'gaussian') does not guarantee (Voracek & Hein 2023).")


def _recorded(group: pd.DataFrame, column: str):
    """The group's value of a column rows written before it existed lack (None then)."""
    if column not in group:
        return None
    values = group[column].dropna()
    return ", ".join(sorted(set(values))) if len(values) else None


def legend_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Short name -> certifier, norm, noise, what its radius covers, full setting and the sources that hold it."""
    records = [{"setting": name, "certifier": group["certifier"].iloc[0], "norm": group["norm"].iloc[0],
                "noise": _recorded(group, "noise"), "covers": _recorded(group, "covers"),
                "sources": ", ".join(dict.fromkeys(group["source"])), "full setting": full}
               for (name, full), group in rows.groupby(["name", "setting"], sort=True)]
    frame = pd.DataFrame(records, columns=["setting", "certifier", "norm", "noise", "covers", "sources",
                                           "full setting"])
    return frame if rows["source"].nunique() > 1 else frame.drop(columns="sources")


def curves_figure(rows: pd.DataFrame, norm: str):
    """The norm's certified-accuracy figure (`pipeline.plots.accuracy_figure`): a curve per fixed-n setting
    with its Theorem 6 band and its largest certifiable radius, markers at the targets of sequential ones."""
    classified = _classified_rows(rows, norm)
    several = rows["source"].nunique() > 1
    limits = {name: recorded_limit(group) for _, name, group in _groups(classified)}
    reach = max([v for v in limits.values() if v is not None] + [float(classified["radius"].max() or 0), 1e-3])
    grid = np.linspace(0, reach * 1.05, 800)
    curves = []
    for source, name, group in _groups(classified):
        targets = recorded_targets(group)
        x = np.asarray(targets) if targets is not None else grid
        alpha, counts = float(group["alpha"].max()), certified_counts(group, x)
        curves.append(plots.Curve(
            label=f"{source}: {name}" if several else name, x=x, y=[count / len(group) for count in counts],
            lower=[stats.certified_accuracy_lower_bound(count, len(group), alpha, RHO) for count in counts],
            points=targets is not None, limit=limits[name], color=name, source=int(group["order"].iloc[0])))
    title = textwrap.fill(f"Certified accuracy, {norm} ({', '.join(_image_counts(classified))})", 80)
    return plots.accuracy_figure(curves, f"{norm} radius (pixel units, inputs in [0, 1])", title, rho=RHO)


def _image_counts(rows: pd.DataFrame) -> list[str]:
    counts = rows.groupby("order", sort=True)["image_id"].nunique()
    sources = rows.groupby("order", sort=True)["source"].first()
    if len(counts) == 1:
        return [f"{int(counts.iloc[0])} images"]
    return [f"{sources[order]}: {int(count)} images" for order, count in counts.items()]


def plot_curves(table: pa.Table, norm: str) -> bytes:
    """PNG of certified accuracy against radius for the settings of `norm` in `table`."""
    return plots.to_png(curves_figure(combined_rows([Source("run", table)]), norm))


def _norms(rows: pd.DataFrame) -> list[str]:
    return sorted(rows.loc[rows["correct"].notna(), "norm"].unique())


def _markdown(frame: pd.DataFrame, floatfmt: str = ".3g") -> str:
    shown = frame.reset_index() if frame.index.name or any(frame.index.names) else frame
    shown = shown.astype(object).where(shown.notna(), None)
    return shown.to_markdown(index=False, floatfmt=floatfmt, missingval="–")


def summary(table: pa.Table, radii: Sequence[float] | None = None, compared: Sequence[Source] = (),
            label: str = "this run") -> str:
    """Markdown: the cost and abstentions per setting, the output certificates' eps_out, certified accuracy at the
    radii and its Theorem 6 lower bound per norm, the error rows, and the legend of setting names."""
    rows = combined_rows([Source(label, table), *compared])
    parts = ["## Cost, errors and abstentions per setting", "", _markdown(_overview(rows), ".4g")]
    if len(_outputs(rows)):
        parts += ["", "## Output certificates: eps_out over the images not abstained on", "",
                  _markdown(_outputs(rows))]
    for norm in _norms(rows):
        norm_radii = table_radii(rows, norm, radii)
        parts += ["", f"## Certified accuracy, {norm} radius", "", _markdown(accuracy_table(rows, norm, norm_radii)),
                  "", f"## Lower bound on the true certified accuracy, {norm} (Cohen et al. Theorem 6, confidence "
                      f"{1 - RHO:g})", "", _markdown(accuracy_table(rows, norm, norm_radii, bound=True))]
    errors = _errors(rows)
    parts += ["", "## Error rows", "", _markdown(errors) if len(errors) else "None."]
    parts += ["", "## Settings", "", COVERS_NOTE, "", _markdown(legend_table(rows))]
    return "\n".join(parts)


def brief(table: pa.Table, radii: Sequence[float] | None = None, compared: Sequence[Source] = (),
          label: str = "this run") -> str:
    """A few lines for the terminal: certified accuracy per norm with ACR, and each output certifier's median
    eps_out; the report holds the rest."""
    rows = combined_rows([Source(label, table), *compared])
    parts = []
    for norm in _norms(rows):
        classified = _classified_rows(rows, norm)
        parts += [f"Certified accuracy, {norm} radius ({', '.join(_image_counts(classified))}):",
                  _markdown(accuracy_table(rows, norm, table_radii(rows, norm, radii)), floatfmt=".3f"), ""]
    for key, entry in _outputs(rows).iterrows():
        parts.append(f"Output certificate, {' '.join(key) if isinstance(key, tuple) else key}: median eps_out "
                     f"{entry['median_eps_out']:.3g} at eps_in {entry['eps_in']:g}, abstained on "
                     f"{entry['abstention_rate']:.0%}")
    errors = int((rows["status"] == "error").sum())
    if errors:
        parts.append(f"{errors} error rows (see the report)")
    return "\n".join(parts).rstrip()


def write_report(table: pa.Table, location: Location, radii: Sequence[float] | None = None,
                 manifest: dict | None = None, compared: Sequence[Source] = (), label: str | None = None) -> str:
    """Writes the report folder: index.html (everything, self-contained), summary.md, certified_accuracy.csv,
    curves_<norm>.png per norm and eps_out.png for the output certifiers; returns the Markdown summary. The run is
    named `label`, else by its manifest's run id."""
    label = label or (manifest or {}).get("run_id") or "this run"
    rows = combined_rows([Source(label, table), *compared])
    text = summary(table, radii, compared, label)
    location.write_bytes("summary.md", (text + "\n").encode())
    images = {}
    for norm in _norms(rows):
        images[f"curves_{norm}.png"] = plots.to_png(curves_figure(rows, norm))
    histogram = _eps_out_figure(rows)
    if histogram is not None:
        images["eps_out.png"] = plots.to_png(histogram)
    for name, png in images.items():
        location.write_bytes(name, png)
    frames = [accuracy_table(rows, norm, table_radii(rows, norm, radii)).assign(norm=norm) for norm in _norms(rows)]
    if frames:
        location.write_bytes("certified_accuracy.csv", pd.concat(frames).to_csv().encode())
    location.write_bytes("index.html", _page(rows, radii, images, manifest, [Source(label, table), *compared]).encode())
    return text


def _eps_out_figure(rows: pd.DataFrame):
    outputs = rows[rows["kind"] == OUTPUT]
    certified = outputs[~outputs["abstained"] & (outputs["status"] == "ok")]
    if not len(certified):
        return None
    several = rows["source"].nunique() > 1
    samples = {(f"{source}: {name}" if several else name): group["eps_out"].to_numpy()
               for source, name, group in _groups(certified)}
    eps_in = ", ".join(f"{value:g}" for value in sorted(certified["eps_in"].unique()))
    return plots.histogram_figure(samples, "certified eps_out (output distance)",
                                  f"Output certificates: eps_out per image at eps_in {eps_in}")


def _page(rows: pd.DataFrame, radii, images: dict[str, bytes], manifest: dict | None, sources: Sequence[Source]) -> str:
    """The self-contained index.html: accuracy per norm (tables, curves, lower bounds), the output
    certificates, cost, abstentions and errors, the setting names, and the run's own settings."""
    table = html_page.table
    accuracy = []
    for norm in _norms(rows):
        norm_radii = table_radii(rows, norm, radii)
        accuracy += [f"<h3>{norm} radius</h3>", table(accuracy_table(rows, norm, norm_radii), "{:.3f}"),
                     html_page.image(images[f"curves_{norm}.png"], f"certified accuracy against {norm} radius"),
                     f"<h3>{norm}: lower bound on the true certified accuracy (Cohen et al. Theorem 6, confidence "
                     f"{1 - RHO:g})</h3>", table(accuracy_table(rows, norm, norm_radii, bound=True), "{:.3f}")]
    note = ('<p class="note">Certified accuracy: the fraction of all images certified correct at radius r or more '
            '(abstentions and errors count as failures). – : not applicable (a sequential setting decides only '
            'its target radii). Names of settings: see Settings.</p>')
    sections = [("Certified accuracy", note + "".join(accuracy) if accuracy else "<p>No labeled rows.</p>")]
    if len(_outputs(rows)):
        sections.append(("Output certificates", table(_outputs(rows), "{:.4g}") + (
            html_page.image(images["eps_out.png"], "distribution of eps_out") if "eps_out.png" in images else "")))
    abstentions, errors = _abstentions(rows), _errors(rows)
    sections.append(("Cost, abstentions and errors", "".join([
        "<h3>Cost per image</h3>", table(_overview(rows), "{:.4g}"),
        "<h3>Abstentions</h3>", table(abstentions) if len(abstentions) else "<p>None.</p>",
        "<h3>Error rows</h3>", table(errors, index=False) if len(errors) else "<p>None.</p>"])))
    sections.append(("Settings", f'<p class="note">{html.escape(COVERS_NOTE)}</p>'
                                 + table(legend_table(rows), index=False)))
    sections.append(("Run", _run_section(manifest, sources)))
    title = f"Certification report: {sources[0].label}"
    return html_page.document(title, sections, subtitle=_subtitle(manifest, rows))


def _subtitle(manifest: dict | None, rows: pd.DataFrame) -> str:
    main = rows[rows["order"] == 0]
    parts = [f"{main['image_id'].nunique()} images", f"{main['setting'].nunique()} settings"]
    if manifest:
        parts += [f"status {manifest.get('status', '?')}", f"started {manifest.get('started', '?')}"]
        if manifest.get("finished"):
            parts.append(f"finished {manifest['finished']}")
        parts.append(f"code {manifest.get('code_version', '?')}")
    if rows["order"].max() > 0:
        parts.append("compared with " + ", ".join(rows.loc[rows["order"] > 0, "source"].unique()))
    return " · ".join(parts)


def _batch_sizes(manifest: dict) -> str:
    """Each actor's rows per forward pass and how it was chosen, e.g. '128 (probe, 1.7 s), 256 (probe, 1.7 s)'."""
    entries = manifest.get("batch")
    if not entries:
        return str(manifest.get("config", {}).get("batch_size"))
    return ", ".join(f"{entry['size']} ({entry['chosen_by']}"
                     + (f", {entry['probe']['seconds']:.1f} s" if entry.get("probe") else "") + ")"
                     for entry in entries)


def _classifier(record: dict | None) -> str | None:
    """One line of what the classifier was: family, name, input size (resized from), weights and digest."""
    if not record:
        return None
    size = "x".join(map(str, record["input_size"])) if record.get("input_size") else "?"
    resized = f" (resized from {'x'.join(map(str, record['resized_from']))})" if record.get("resized_from") else ""
    weights = record.get("weights") or "shipped weights"
    digest = f", sha256 {record['weights_sha256'][:12]}..." if record.get("weights_sha256") else ""
    return f"{record['name']} ({record['family']}), {record['num_classes']} classes, {size} inputs{resized}; " \
           f"{weights}{digest}"


def _run_section(manifest: dict | None, sources: Sequence[Source]) -> str:
    """The run's settings from its manifest (dataset, model, seed, environment, counts) and the sources
    compared with it."""
    parts = []
    if manifest:
        config = manifest.get("config", {})
        facts = {"run id": manifest.get("run_id"), "status": manifest.get("status"),
                 "attempts": manifest.get("attempts"), "started": manifest.get("started"),
                 "finished": manifest.get("finished"), "dataset": json.dumps(config.get("dataset")),
                 "model": json.dumps(config.get("model")), "classifier": _classifier(manifest.get("classifier")),
                 "seed": config.get("seed"),
                 "precision": config.get("precision"),
                 "batch size": _batch_sizes(manifest),
                 "actors": json.dumps(config.get("actors")), "code version": manifest.get("code_version"),
                 "python": manifest.get("python"), "packages": json.dumps(manifest.get("packages")),
                 "driver host": manifest.get("driver_host"), "counts": json.dumps(manifest.get("counts"))}
        frame = pd.DataFrame({"": list(facts), "value": [str(v) if v is not None else "–" for v in facts.values()]})
        parts += [html_page.table(frame, index=False), "<h3>Configuration</h3>",
                  html_page.preformatted(json.dumps(config, indent=2, sort_keys=True, default=str))]
    else:
        parts.append("<p>No manifest: the report was written from result rows alone.</p>")
    if len(sources) > 1:
        frame = pd.DataFrame([{"source": s.label, "from": s.origin or "–", "rows": s.table.num_rows,
                               "images": len(set(s.table["image_id"].to_pylist()))} for s in sources])
        parts += ["<h3>Sources</h3>", html_page.table(frame, index=False)]
    return "".join(parts)
