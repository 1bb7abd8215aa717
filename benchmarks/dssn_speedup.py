"""DSSN seconds per image against Cohen's CERTIFY at N = 100,000, same model and images, one run.

    python benchmarks/dssn_speedup.py             # demo CNN, 4 demo digits

DSSN needs L = int(2 sqrt(3) sigma 255) forward passes per image (441 at sigma 0.5, 3091 at sigma 3.5),
Cohen n0 + N = 100,100. Levine & Feizi's stored timings give 227x (CIFAR-10, sigma 0.5) and 33x (sigma 3.5).
"""

from __future__ import annotations

import argparse
import time

import torch

import pipeline
from pipeline.certifiers import DSSN, Cohen
from pipeline.data.demo import load_demo
from pipeline.models import load_demo_model

PAPER = {0.5: 227, 3.5: 33}


def seconds_per_image(model, images, ids, certifier, batch_size: int) -> float:
    started = time.perf_counter()
    pipeline.certify(model, images, None, [certifier], image_ids=ids, batch_size=batch_size)
    return (time.perf_counter() - started) / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4, help="demo images (default 4)")
    parser.add_argument("--batch-size", type=int, default=1000, help="rows per forward pass (default 1000)")
    args = parser.parse_args()
    images, _, ids = load_demo("test")
    images, ids = images[: args.images].float() / 255, ids[: args.images]
    model = load_demo_model()
    pipeline.certify(model, images[:1], None, [DSSN(sigma=0.5)], batch_size=args.batch_size)  # warm-up

    cohen = seconds_per_image(model, images, ids, Cohen(sigma=0.25, n0=100, n=100_000), args.batch_size)
    print(f"\ndemo CNN, {args.images} images, batch {args.batch_size}, {torch.get_num_threads()} threads\n")
    print("| certifier | forward passes / image | s / image | Cohen / DSSN | paper's speed-up |")
    print("|---|---:|---:|---:|---:|")
    print(f"| cohen, N = 100,000, n0 = 100 | 100,100 | {cohen:.3f} | 1 | |")
    for sigma, paper in PAPER.items():
        certifier = DSSN(sigma=sigma)
        dssn = seconds_per_image(model, images, ids, certifier, args.batch_size)
        print(f"| dssn, sigma {sigma} | {certifier.levels:,} | {dssn:.4f} | {cohen / dssn:.0f}x | {paper}x |")


if __name__ == "__main__":
    main()
