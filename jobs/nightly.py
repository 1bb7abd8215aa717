"""The nightly benchmark job: `python jobs/nightly.py --config jobs/configs/nightly_demo.yaml [--date YYYY-MM-DD]`.

Runs the suite (the same dataset subset, certifiers and seeds for every model), writes
`<output>/nightly/<date>/` (figures.parquet, environment.json, report.md, accuracy.png, and each model's
run), compares with the most recent earlier night in the same output (see `pipeline.nightly` for the
tests), prints the figures that moved, and exits 1 on a regression.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import logging
import sys
import time

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from matplotlib.figure import Figure

from pipeline import nightly
from pipeline.config import NightlySuite, read_yaml
from pipeline.distributed.certify import run
from pipeline.results import environment, read_results

log = logging.getLogger("nightly")


def run_suite(suite: NightlySuite, date: str) -> tuple[pd.DataFrame, dict]:
    night = suite.storage.open(suite.output).join("nightly", date)
    frames, devices = [], []
    for entry in suite.models:
        config = suite.run_config(entry, night.join("runs").uri)
        started = time.perf_counter()
        uri = run(config)
        seconds = time.perf_counter() - started
        results = read_results(config.storage.open(uri).join("results"))
        count = config.actors.count * max(1, int(config.actors.gpus))
        devices.append({"model": entry["label"], "devices": count, "device": "gpu" if config.actors.gpus else "cpu",
                        "nodes": sorted(set(results["node"].to_pylist()))})
        frames.append(nightly.figures(entry["label"], results, suite.radii, seconds, count,
                                      suite.price_per_device_hour))
    return pd.concat(frames, ignore_index=True), {**environment(), "date": date, "devices": devices}


def previous_night(suite: NightlySuite, date: str) -> tuple[str, pd.DataFrame] | None:
    root = suite.storage.open(suite.output).join("nightly")
    listed = root.fs.get_file_info(pafs.FileSelector(root.path, allow_not_found=True))
    nights = sorted(info.base_name for info in listed if info.type == pafs.FileType.Directory and info.base_name < date)
    for name in reversed(nights):
        location = root.join(name)
        if location.join("figures.parquet").exists():
            return name, pq.read_table(io.BytesIO(location.read_bytes("figures.parquet"))).to_pandas()
    return None


def plot(figures: pd.DataFrame) -> bytes:
    accuracy = figures[figures["figure"].str.startswith("certified_accuracy@")]
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    for (model, setting), group in accuracy.groupby(["model", "setting"]):
        radii = group["figure"].str.split("@").str[1].astype(float)
        axes.plot(radii, group["value"], marker="o", label=f"{model}: {setting}")
    axes.set(xlabel="radius", ylabel="certified accuracy", ylim=(0, 1), title="Nightly certified accuracy")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=6)
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, metavar="FILE", help="YAML benchmark suite")
    parser.add_argument("--date", default=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
                        help="the night's date, YYYY-MM-DD (default: today, UTC)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a suite value, e.g. models.0.model.weights=PATH (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    suite = NightlySuite.from_dict(read_yaml(args.config, args.set))

    figures, env = run_suite(suite, args.date)
    night = suite.storage.open(suite.output).join("nightly", args.date)
    night.write_parquet("figures.parquet", pa.Table.from_pandas(figures, preserve_index=False))
    night.write_json("environment.json", env)
    night.write_bytes("accuracy.png", plot(figures))

    lines = [f"# Nightly benchmark {args.date}", "", f"code {env['code_version']}, packages "
             f"{json.dumps(env['packages'])}", "", figures.drop(columns=["worse_when"]).to_markdown(index=False)]
    earlier = previous_night(suite, args.date)
    regressions = pd.DataFrame()
    if earlier is None:
        lines += ["", "No earlier night in this output to compare with."]
    else:
        name, last = earlier
        comparison = nightly.compare(figures, last, suite.accuracy_alpha, suite.throughput_tolerance)
        regressions = comparison[comparison["regression"]]
        lines += ["", f"## Against {name}", "", comparison.to_markdown(index=False)]
    night.write_bytes("report.md", ("\n".join(lines) + "\n").encode())
    log.info("nightly results in %s", night.uri)
    if len(regressions):
        for _, row in regressions.iterrows():
            print(f"REGRESSION {row['model']} {row['setting']} {row['figure']}: {row['value_last']:.4g} -> "
                  f"{row['value']:.4g} ({row['reason']})")
        return 1
    print(f"no regression; report: {night.uri}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
