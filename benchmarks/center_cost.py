"""Center smoothing seconds per image at the paper's n and m, exact against 30-candidate centres.

    python benchmarks/center_cost.py              # demo CNN features, l2, n = 10^4, m = 10^6, 1 image

Both runs use the same model, image and settings; the forward passes per image are 2n + m + 1 (exact)
and 30 + 2n + m + 1 (30 candidates). The exact search also computes n^2 = 10^8 distances.
"""

from __future__ import annotations

import argparse
import time

import torch

import pipeline
from pipeline.certifiers import Center
from pipeline.certifiers.center import output_head
from pipeline.data.demo import load_demo
from pipeline.engine import Engine
from pipeline.models import load_demo_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1, help="demo images (default 1)")
    parser.add_argument("--n", type=int, default=10_000, help="centre-search and check draws (default 10^4)")
    parser.add_argument("--m", type=int, default=1_000_000, help="certification draws (default 10^6)")
    parser.add_argument("--batch-size", type=int, default=1000, help="rows per forward pass (default 1000)")
    args = parser.parse_args()
    images, _, ids = load_demo("test")
    images, ids = images[: args.images].float() / 255, ids[: args.images]
    model = load_demo_model()
    print(f"\ndemo CNN features (32-d), l2, sigma 0.25, eps_in 0.25, n = {args.n:,}, m = {args.m:,}, "
          f"{args.images} image(s), batch {args.batch_size}, {torch.get_num_threads()} threads\n")
    print("| centres | forward passes / image | s / image | of which centre search + check | median eps_out "
          "| abstained |")
    print("|---|---:|---:|---:|---:|---:|")
    for centers in ("exact", 30):
        certifier = Center(sigma=0.25, eps_in=0.25, output="features", metric="l2", n=args.n, m=args.m,
                           centers=centers)
        started = time.perf_counter()
        table = pipeline.certify(model, images, None, [certifier], image_ids=ids, batch_size=args.batch_size)
        seconds = (time.perf_counter() - started) / args.images
        rows = table.to_pandas()
        engine = Engine(model, batch_size=args.batch_size)
        started = time.perf_counter()
        certifier.smooth(engine.session(), images, ids, 0, output_head(model, "features"))
        search = (time.perf_counter() - started) / args.images
        print(f"| {centers} | {certifier.cost.forward_passes:,} | {seconds:.1f} | {search:.1f} "
              f"| {rows.eps_out.median():.3f} | {int(rows.abstained.sum())}/{len(rows)} |", flush=True)


if __name__ == "__main__":
    main()
