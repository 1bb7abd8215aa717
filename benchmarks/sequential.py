"""Sequential certification against fixed-N CERTIFY: forward passes, wall time and the certified-accuracy
table, same model, images and seed, one run.

    python benchmarks/sequential.py                          # demo CNN, 100 test digits, sigma 0.25
    python benchmarks/sequential.py --images 300 --radii 0.25 0.5 0.75

Fixed N spends n0 + N = 100,100 passes on every image. The sequential modes test each target radius r
(H0: p_A <= Phi(r / sigma)) with anytime-valid bounds and stop an image once every target is decided, with
N as the budget; max_radius keeps going while the radius can still grow by min_gain. Same alpha for all.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import pipeline
from pipeline import report
from pipeline.certifiers import Cohen
from pipeline.data.demo import load_demo
from pipeline.models import load_demo_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100, help="demo test digits (default 100)")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--radii", type=float, nargs="+", default=[0.25, 0.5], help="target radii (default 0.25 0.5)")
    parser.add_argument("--n", type=int, default=100_000, help="fixed N, and the sequential budget")
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--batch-size", type=int, default=1000)
    args = parser.parse_args()
    images, labels, ids = load_demo("test")
    images, labels, ids = images[: args.images].float() / 255, labels[: args.images], ids[: args.images]
    model = load_demo_model()
    common = {"sigma": args.sigma, "alpha": args.alpha, "n0": 100, "n": args.n}
    runs = {
        f"fixed N = {args.n:,}": Cohen(**common),
        "sequential, mixture": Cohen(**common, mode="sequential", radii=args.radii, test="mixture"),
        "sequential, CP looks": Cohen(**common, mode="sequential", radii=args.radii, test="looks"),
        "max_radius, mixture": Cohen(**common, mode="max_radius", test="mixture"),
    }
    pipeline.certify(model, images[:1], None, [Cohen(sigma=args.sigma, n=2000)], batch_size=args.batch_size)

    tables, seconds = {}, {}
    for name, certifier in runs.items():
        started = time.perf_counter()
        tables[name] = pipeline.certify(model, images, labels, [certifier], image_ids=ids,
                                        batch_size=args.batch_size)
        seconds[name] = time.perf_counter() - started

    fixed_name = next(iter(runs))
    fixed = tables[fixed_name].to_pandas()
    fixed_passes = fixed["forward_passes"].mean()
    radii = [0.0, *args.radii]
    print(f"\ndemo CNN, {args.images} test digits, sigma {args.sigma}, alpha {args.alpha}, targets {args.radii}, "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads\n")
    header = " | ".join(f"r = {r:g}" for r in radii)
    print(f"| mode | passes / image | fewer passes | s / image | faster | {header} | ACR | decisions as fixed |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(radii) + "---:|---:|")
    for name, table in tables.items():
        rows = table.to_pandas()
        passes = rows["forward_passes"].mean()
        accuracy = report.certified_accuracy(table, radii).iloc[0]
        acr = float((rows["radius"] * rows["correct"].astype(bool)).mean())
        agree = np.mean([((rows["radius"] > r) & ~rows["abstained"]).to_numpy() ==
                         ((fixed["radius"] > r) & ~fixed["abstained"]).to_numpy() for r in args.radii])
        cells = " | ".join(f"{value:.3f}" for value in accuracy)
        print(f"| {name} | {passes:,.0f} | {fixed_passes / passes:.1f}x | {seconds[name] / len(rows):.3f} | "
              f"{seconds[fixed_name] / seconds[name]:.1f}x | {cells} | {acr:.3f} | {agree:.3f} |")


if __name__ == "__main__":
    main()
