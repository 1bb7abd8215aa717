"""Smooth-Reduce (mean and max) against Cohen on the demo model: same images, same sigma, one run.

    python benchmarks/smooth_reduce_compare.py            # 20 demo digits, sigma 0.25, n = 1000

Smooth-Reduce resizes 32 -> 36 and reduces the 25 grid patches of 32x32 (the CIFAR-10 setting of the
paper). Prints certified accuracy at a grid of l2 radii, ACR, forward passes and seconds per image, and
writes the curves to benchmarks/smooth_reduce_curves.png.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pyarrow as pa
import torch

import pipeline
from pipeline import report
from pipeline.certifiers import Cohen, SmoothReduce
from pipeline.data.demo import load_demo
from pipeline.models import load_demo_model

RADII = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20, help="demo images (default 20)")
    parser.add_argument("--n", type=int, default=1000, help="estimation draws (default 1000)")
    parser.add_argument("--sigma", type=float, default=0.25, help="noise scale (default 0.25)")
    args = parser.parse_args()
    images, labels, ids = load_demo("test")
    images, labels, ids = images[: args.images].float() / 255, labels[: args.images], ids[: args.images]
    model = load_demo_model()
    settings = {"sigma": args.sigma, "n0": 100, "n": args.n}
    variants = (("mean", "shared"), ("max", "shared"), ("mean", "independent"))
    certifiers = [Cohen(**settings)] + [SmoothReduce(patch_size=32, resize_to=36, reduce=reduce, noise=noise,
                                                     **settings) for reduce, noise in variants]
    tables, seconds = [], []
    for certifier in certifiers:
        started = time.perf_counter()
        tables.append(pipeline.certify(model, images, labels, [certifier], image_ids=ids))
        seconds.append((time.perf_counter() - started) / args.images)
    print(f"\ndemo CNN, {args.images} digits, sigma {args.sigma}, n0 = 100, n = {args.n}, "
          f"{torch.get_num_threads()} threads; radii in input (32x32) space\n")
    header = " | ".join(f"r={r:g}" for r in RADII)
    print(f"| certifier | {header} | ACR | passes / image | s / image | cost vs Cohen |")
    print("|---|" + "---:|" * (len(RADII) + 4))
    for certifier, table, second in zip(certifiers, tables, seconds, strict=True):
        accuracy = report.certified_accuracy(table, RADII).iloc[0].tolist()
        rows = table.to_pandas()
        acr = float((rows.radius * rows.correct.astype(bool)).mean())
        name = "cohen" if certifier.name == "cohen" else f"smooth_reduce {certifier.reduce}, {certifier.noise} noise"
        cells = " | ".join(f"{value:.2f}" for value in accuracy)
        print(f"| {name} | {cells} | {acr:.3f} | {int(rows.forward_passes.mean()):,} | {second:.2f} "
              f"| {second / seconds[0]:.1f}x |")
    output = Path(__file__).with_name("smooth_reduce_curves.png")
    output.write_bytes(report.plot_curves(pa.concat_tables(tables), "l2"))
    print(f"\ncurves: {output}")


if __name__ == "__main__":
    main()
