"""End-to-end images/s of the Ray certification job over the engine alone, same images and settings.

    python benchmarks/job_overhead.py                 # 300 demo digits, cohen + topk at n = 2000

The engine alone: the decoded images certified in this process, `images_per_batch` at a time, with one
engine (the same code the actors run). The job: `pipeline.distributed.certify.run` on a local Ray instance
(started beforehand; its start-up time is printed separately), from the dataset listing to the report,
with one actor given all the cores, and again with one single-threaded actor per core.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import ray
import torch

from pipeline.certification import certify_rows
from pipeline.config import validate
from pipeline.data.preprocess import decode
from pipeline.data.sources import list_images
from pipeline.distributed.certify import run
from pipeline.engine import Engine
from pipeline.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300, help="demo images to certify (default 300)")
    parser.add_argument("--n", type=int, default=2000, help="estimation draws per certificate (default 2000)")
    parser.add_argument("--images-per-batch", type=int, default=20, help="images per actor call (default 20)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    base = {
        "dataset": {"layout": "demo", "max": args.images}, "model": {"name": "demo_cnn"}, "seed": 0,
        "batch_size": 1000, "images_per_batch": args.images_per_batch,
        "certifiers": [{"name": "cohen", "sigma": 0.25, "n0": 100, "n": args.n},
                       {"name": "topk", "k": 3, "sigma": 0.25, "n": args.n}],
    }
    config = validate(base)

    listing = list_images(config.dataset)
    transform = config.dataset.transform
    images = torch.stack([torch.from_numpy(decode(data, transform)) for data in listing["image"].to_pylist()])
    labels, ids = listing["label"].to_pylist(), listing["image_id"].to_pylist()
    engine = Engine(load_model(config.model), batch_size=config.batch_size)
    certifiers = config.certifiers
    started = time.perf_counter()
    for first in range(0, len(ids), args.images_per_batch):
        chunk = slice(first, first + args.images_per_batch)
        certify_rows(engine, images[chunk].float() / 255, labels[chunk], certifiers, seed=0, image_ids=ids[chunk])
    engine_rate = len(ids) / (time.perf_counter() - started)

    started = time.perf_counter()
    ray.init(num_cpus=max(4, cores), include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - started
    rates = {}
    with tempfile.TemporaryDirectory() as output:
        for label, actors in [(f"1 actor x {cores} threads", {"count": 1, "cpus": cores}),
                              (f"{cores} actors x 1 thread", {"count": cores, "cpus": 1})]:
            started = time.perf_counter()
            run(validate({**base, "output": output, "run_id": label.replace(" ", "_"), "actors": actors}))
            rates[label] = len(ids) / (time.perf_counter() - started)
    ray.shutdown()

    print(f"\n{len(ids)} demo images, cohen + topk (k=3) at n = {args.n}, n0 = 100, batch 1000, "
          f"{args.images_per_batch} images per actor call, {cores} cores; Ray start-up {ray_start:.1f} s (excluded)\n")
    print("| path | images/s | job / engine alone |")
    print("|---|---:|---:|")
    print(f"| engine alone (in process, {torch.get_num_threads()} threads) | {engine_rate:.2f} | 1.000 |")
    for label, rate in rates.items():
        print(f"| Ray job, {label} | {rate:.2f} | {rate / engine_rate:.3f} |")


if __name__ == "__main__":
    main()
