"""Forward passes per image of a config's certifiers, with and without sharing draws, and the same tables.

    python benchmarks/sharing.py                          # the demo config, 20 demo digits
    python benchmarks/sharing.py --config jobs/configs/demo.yaml --images 50

Three ways to run the same certifiers on the same images and seed:
  separately   each certifier on its own engine: nothing shared;
  by kind      the counting certifiers in one pass (Cohen and TopK share their draws), each sampling
               certifier (center, Smooth-Reduce, the sequential modes) on its own engine;
  together     one `certify_rows` call: center's certification draws also give Cohen's and TopK's votes,
               and the sequential looks are answered from the counts already drawn.
It prints the model evaluations per image of each, checks that every certificate is identical across
the three (prediction, radius, p_lower, count, eps_out) and prints the certified-accuracy table of each.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyarrow as pa

from pipeline import report
from pipeline.certification import certify_rows
from pipeline.config import load_config
from pipeline.data.demo import load_demo
from pipeline.engine import Engine
from pipeline.models import load_model
from pipeline.results import to_table

CERTIFICATE = ["image_id", "setting", "prediction", "radius", "p_lower", "count", "n", "eps_out", "status"]


def run(model, groups, images, labels, ids, seed: int, batch_size) -> tuple[pa.Table, int, float]:
    """Rows, model evaluations and seconds of certifying with each group of certifiers on a fresh engine;
    the evaluations as the rows account for them (forward_passes less shared_passes)."""
    rows, passes, started = [], 0, time.perf_counter()
    for group in groups:
        engine = Engine(model, batch_size=batch_size)
        group_rows = certify_rows(engine, images, labels, group, seed=seed, image_ids=ids)
        passes += sum(row["forward_passes"] - json.loads(row["params"]).get("shared_passes", 0) for row in group_rows)
        rows += group_rows
    table = to_table(rows).sort_by([("image_id", "ascending"), ("setting", "ascending")])
    return table, passes, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("jobs/configs/demo.yaml"), help="a run config")
    parser.add_argument("--images", type=int, default=20, help="demo test digits to certify (default 20)")
    parser.add_argument("--batch-size", default="128", help="rows per forward pass, or auto (default 128)")
    args = parser.parse_args()
    config = load_config(args.config, [])
    certifiers = config.certifiers
    model = load_model(config.model, config.storage)
    pixels, labels, ids = load_demo("test")
    images, labels, ids = pixels[: args.images].float() / 255, labels[: args.images].tolist(), ids[: args.images]
    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    counting = [certifier for certifier in certifiers if not certifier.self_sampling]
    sampling = [[certifier] for certifier in certifiers if certifier.self_sampling]
    ways = {"separately": [[certifier] for certifier in certifiers], "by kind": [counting, *sampling],
            "together": [certifiers]}
    results = {name: run(model, groups, images, labels, ids, config.seed, batch_size) for name, groups in ways.items()}

    print(f"{args.config}: {len(certifiers)} certifiers, {len(ids)} demo digits, seed {config.seed}, "
          f"batch {args.batch_size}\n")
    print("| run | model evaluations per image | seconds per image | vs by kind |\n|---|---:|---:|---:|")
    base = results["by kind"][1]
    for name, (_, passes, seconds) in results.items():
        print(f"| {name} | {passes / len(ids):,.0f} | {seconds / len(ids):.2f} | {passes / base:.3f} |")
    together = results["together"][0].to_pandas()
    shared = together["params"].map(lambda params: json.loads(params).get("shared_passes", 0))
    print("\nshared_passes per image by setting (together):")
    print(shared.groupby(together["certifier"] + " " + together["setting"].str.slice(0, 60)).mean().to_string())
    reference = results["separately"][0].select(CERTIFICATE)
    for name, (rows, _, _) in results.items():
        same = rows.select(CERTIFICATE).equals(reference)
        print(f"\n{name}: every certificate identical to 'separately': {same}")
        print(report.certified_accuracy(rows, [0.0, 0.25, 0.5]).to_markdown())


if __name__ == "__main__":
    main()
