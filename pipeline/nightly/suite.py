"""The nightly benchmark's night: `pipeline nightly --config jobs/configs/nightly_demo.yaml [--date YYYY-MM-DD]`.

Runs the suite (the same dataset subset, certifiers and seeds for every model), writes
`<output>/nightly/<date>/` (figures.parquet, environment.json, report.md, accuracy.png, and each model's
run), compares with the most recent earlier night in the same output (see `pipeline.nightly.regression`
for the tests) and prints the figures that moved. Tonight's files are written whatever the comparison finds.

Rerunning a date reuses the runs that night already certified; throughput is measured only over the images
certified by tonight's attempt, so a rerun that certified nothing records no throughput (NaN, noted in
report.md) and is never compared on it, neither tonight nor by the next night.

The figures record what identifies each model's entry (`regression.IDENTITY`, from `entry_identity`), so a
suite that changed (a model's label, section or weights, a certifier parameter, the dataset) is reported as
such: its figures are listed as not compared, never passed as "no regression".

Exit codes (`pipeline.cli.NIGHTLY_EXIT_CODES`): 0 no regression (or no earlier night), 1 a regression among
the figures compared (whatever else changed), 2 an invalid suite or bad arguments, 3 could not compare with a
damaged earlier night, 4 no regression among the figures compared, but some were not compared because the
suite changed, 5 a model's run failed or could not start.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs

from pipeline import plots
from pipeline.config import NightlySuite, RunConfig
from pipeline.distributed.certify import run
from pipeline.labels import short_labels
from pipeline.models import load_model
from pipeline.models.denoisers import classifier_digest
from pipeline.nightly import regression
from pipeline.results import environment
from pipeline.storage import Location

log = logging.getLogger("nightly")

EXIT_OK, EXIT_REGRESSION, EXIT_INVALID, EXIT_NOT_COMPARED, EXIT_SUITE_CHANGED, EXIT_RUN_FAILED = 0, 1, 2, 3, 4, 5
RESULT_SETTINGS = ("dataset", "seed", "precision", "channels_last", "compile")  # a run's settings beside the model
FIGURE_COLUMNS = {"model", "setting", "figure", "value", "successes", "count", "kind", "worse_when"}

__all__ = ["EXIT_INVALID", "EXIT_NOT_COMPARED", "EXIT_OK", "EXIT_REGRESSION", "EXIT_RUN_FAILED",
           "EXIT_SUITE_CHANGED", "DamagedNight", "comparison_section", "entry_identity", "night", "plot",
           "previous_night", "read_figures", "run_suite"]


class DamagedNight(Exception):
    """An earlier night whose figures cannot be read: `night` (its date) and the message naming the file."""

    def __init__(self, night: str, message: str):
        super().__init__(message)
        self.night = night


def entry_identity(config: RunConfig) -> dict[str, str]:
    """What identifies a model's entry (`regression.IDENTITY`): its model section and the run settings that
    change results (`RESULT_SETTINGS`) as sorted JSON, and the sha256 of the loaded model's state dict (the
    classifier, with its denoiser), so other weights under the same path or label are told apart."""
    data = config.to_dict()
    return {"model_spec": json.dumps(data["model"], sort_keys=True),
            "model_sha256": classifier_digest(load_model(config.model, config.storage)),
            "run_spec": json.dumps({key: data.get(key) for key in RESULT_SETTINGS}, sort_keys=True)}


def run_suite(suite: NightlySuite, date: str) -> tuple[pd.DataFrame, dict]:
    """Every model's run of the night (reusing what an earlier attempt of the same date certified) and its
    figures, with the environment and each entry's identity; throughput from the images this attempt
    certified (the run manifest's counts["certified"]) over the seconds it took."""
    night = suite.storage.open(suite.output).join("nightly", date)
    frames, devices = [], []
    for entry in suite.models:
        config = suite.run_config(entry, night.join("runs").uri)
        started = time.perf_counter()
        summary = run(config)
        seconds = time.perf_counter() - started
        results, certified_tonight = summary.results, summary.counts["certified"]
        actors = summary.counts.get("actors", config.actors.count if config.actors.count != "auto" else 1)
        count = actors * max(1, int(config.actors.gpus))
        devices.append({"model": entry.label, "devices": count, "device": "gpu" if config.actors.gpus else "cpu",
                        "nodes": sorted(set(results["node"].to_pylist())), "certified_tonight": certified_tonight})
        identity = entry_identity(config)
        devices[-1]["entry"] = identity
        frames.append(regression.figures(entry.label, results, suite.radii, seconds, count,
                                         suite.price_per_device_hour, certified_tonight, identity))
    return pd.concat(frames, ignore_index=True), {**environment(), "date": date, "devices": devices}


def previous_night(suite: NightlySuite, date: str) -> tuple[str, pd.DataFrame] | None:
    """The most recent night before `date` with a figures.parquet, and its figures; None when there is none.
    Raises DamagedNight when that file cannot be read as a table of figures."""
    root = suite.storage.open(suite.output).join("nightly")
    nights = sorted(info.base_name for info in root.entries()
                    if info.type == pafs.FileType.Directory and info.base_name < date)
    for name in reversed(nights):
        location = root.join(name)
        if location.join("figures.parquet").exists():
            return name, read_figures(name, location)
    return None


def read_figures(name: str, location: Location) -> pd.DataFrame:
    """The figures.parquet of night `name` at `location`; DamagedNight naming the file if it is unreadable
    or lacks the figure columns."""
    uri = location.join("figures.parquet").uri
    try:
        figures = location.read_parquet("figures.parquet").to_pandas()
    except (pa.ArrowException, OSError) as error:
        raise DamagedNight(name, f"{uri} is unreadable: {type(error).__name__}: {error}") from error
    missing = sorted(FIGURE_COLUMNS - set(figures.columns))
    if missing:
        raise DamagedNight(name, f"{uri} lacks the figure column(s) {missing}")
    return figures


def plot(figures: pd.DataFrame) -> bytes:
    """Certified accuracy at the suite's radii: a panel per norm (the figures' `norm`), a line per (model,
    setting) with short setting names; a setting with target radii (sequential) only at those."""
    accuracy = figures[figures["figure"].str.startswith("certified_accuracy@")]
    names = short_labels(accuracy["setting"].unique())
    models = list(dict.fromkeys(accuracy["model"]))
    panels: dict[str, list] = {}
    for (model, setting), group in accuracy.groupby(["model", "setting"], sort=True):
        radii = group["figure"].str.split("@").str[1].astype(float).to_numpy()
        keep = np.argsort(radii)
        targets = group["targets"].iloc[0] if "targets" in group else None
        sequential = targets is not None and len(targets) > 0
        if sequential:
            keep = [i for i in keep if any(np.isclose(radii[i], targets))]
        norm = group["norm"].iloc[0] if "norm" in group else None
        panels.setdefault(norm or "radius", []).append(plots.Curve(
            label=f"{model}: {names[setting]}", x=radii[keep], y=group["value"].to_numpy()[keep],
            color=names[setting], source=models.index(model), marker="o", points=sequential))
    images = int(accuracy["count"].max()) if len(accuracy) else 0
    figure = plots.accuracy_panels([(curves, f"{norm} radius (pixel units)", f"Nightly certified accuracy, {norm} "
                                    f"({images} images)") for norm, curves in sorted(panels.items())])
    return plots.to_png(figure, dpi=110)


def figures_section(date: str, env: dict, figures: pd.DataFrame) -> list[str]:
    """The report's head: the night, code and packages, each model's entry, tonight's figures and a note for
    reused throughput."""
    shown = figures.drop(columns=["worse_when", "targets", *regression.IDENTITY], errors="ignore")
    lines = [f"# Nightly benchmark {date}", "", f"code {env['code_version']}, packages "
             f"{json.dumps(env['packages'])}", ""]
    if set(regression.IDENTITY) <= set(figures.columns):
        entries = figures.drop_duplicates("model")[["model", *regression.IDENTITY]]
        lines += ["Suite entries (what identifies each model's figures):", "",
                  entries.to_markdown(index=False), ""]
    lines.append(shown.to_markdown(index=False))
    reused = sorted(set(figures.loc[regression.is_reused(figures), "model"]))
    if reused:
        note = (f"Throughput not measured for {', '.join(reused)}: every image was already certified by an "
                f"earlier attempt of this night (reused), so images_per_s, device_seconds_per_image and "
                f"cost_per_image are NaN and not compared.")
        log.warning(note)
        lines += ["", note]
    return lines


def comparison_section(suite: NightlySuite, date: str, figures: pd.DataFrame) -> tuple[list[str], int]:
    """The report's comparison with the most recent earlier night, and the exit code it gives (see the module
    docstring); prints the regressions, the figures not compared because the suite changed, or the damaged
    night."""
    try:
        earlier = previous_night(suite, date)
    except DamagedNight as damaged:
        print(f"COULD NOT COMPARE with the night {damaged.night}: {damaged}")
        return ["", f"## Not compared with {damaged.night}", "", f"The night {damaged.night} is damaged: "
                f"{damaged}"], EXIT_NOT_COMPARED
    if earlier is None:
        return ["", "No earlier night in this output to compare with."], EXIT_OK
    name, last = earlier
    comparison = regression.compare(figures, last, suite.accuracy_alpha, suite.throughput_tolerance)
    for _, row in comparison[comparison["regression"]].iterrows():
        print(f"REGRESSION {row['model']} {row['setting']} {row['figure']}: {row['value_last']:.4g} -> "
              f"{row['value']:.4g} ({row['reason']})")
    lines, code = _changes(name, comparison)
    compared = comparison[~comparison["changed"]]
    table = compared.drop(columns="changed").to_markdown(index=False) if len(compared) else "No figure compared."
    if comparison["regression"].any():
        code = EXIT_REGRESSION
    return ["", f"## Against {name}", "", table, *lines], code


def _changes(name: str, comparison: pd.DataFrame) -> tuple[list[str], int]:
    """The report's list of figures not compared because the suite changed since night `name` (also printed),
    and EXIT_SUITE_CHANGED when there are any."""
    reasons = regression.not_compared(comparison)
    if not reasons:
        return [], EXIT_OK
    changed = int(comparison["changed"].sum())
    if comparison["changed"].all():
        head = f"NOT COMPARED: no figure of tonight matches the night {name} (the suite changed)"
    else:
        head = (f"NOT COMPARED: {changed} of {len(comparison)} figures do not match the night {name} (the suite "
                f"changed); the other {len(comparison) - changed} were compared")
    print(head)
    for reason in reasons:
        print(f"  {reason}")
    return ["", f"## {head}", "", *[f"- {reason}" for reason in reasons]], EXIT_SUITE_CHANGED


FINAL_LINES = {EXIT_OK: "no regression", EXIT_SUITE_CHANGED: "no regression among the figures compared; the "
               "suite changed, so some were not compared (exit 4)"}


def night(suite: NightlySuite, date: str) -> int:
    """Runs the night `date` of `suite`, writes its files and report; returns the exit code (see the module
    docstring)."""
    figures, env = run_suite(suite, date)
    folder = suite.storage.open(suite.output).join("nightly", date)
    folder.write_parquet("figures.parquet", pa.Table.from_pandas(figures, preserve_index=False))
    folder.write_json("environment.json", env)
    folder.write_bytes("accuracy.png", plot(figures))
    comparison, code = comparison_section(suite, date, figures)
    folder.write_bytes("report.md", ("\n".join(figures_section(date, env, figures) + comparison) + "\n").encode())
    log.info("nightly results in %s", folder.uri)
    if code in FINAL_LINES:
        print(f"{FINAL_LINES[code]}; report: {folder.uri}/report.md")
    return code
