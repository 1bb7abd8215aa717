"""Engine throughput against the raw forward pass of the same model, in one run.

    python benchmarks/throughput.py                        # CPU: demo CNN and a nearly free model
    python benchmarks/throughput.py --device cuda --models resnet50 --images 4 --draws 20000 \
        --batch-size 500 --channels-last [--precision bf16] [--compile]

For each model, at one batch size, it measures noise draws per second of
  forward     the model alone on a fixed batch (no noise): the ceiling;
  floor       fresh Gaussian noise, the add, and the forward per batch: what any sampler must pay;
  engine      pipeline's Engine.count on several images (seeded blocks, packing, on-device counting);
  sequential  Engine.sequential on the same draws asked for in looks (100, x1.5, ..., in whole blocks): continuous
              batching with one read of the counts per round;
  per-image   a per-image loop as in the reference code: one image per call, noise by randn_like,
              a host sync and numpy counting per batch;
and prints the ratios, and the engine's seconds per image at n0 + N = 100,100. Each figure is the best of
--repeats rounds in which the five alternate. --precision, --channels-last and --compile apply to all
five (the forward baseline runs the same model the same way).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
import torchvision
from torch import nn

from pipeline.certifiers.sequential import block_looks
from pipeline.engine import PRECISIONS, Draws, Engine
from pipeline.models import DemoCNN


class NearlyFree(nn.Module):
    """Mean over pixels per channel, then a linear head: the forward costs almost nothing."""

    def __init__(self, channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.head(x.mean(dim=(2, 3)))


def make_model(name: str) -> tuple[nn.Module, tuple[int, int, int]]:
    if name == "demo":
        return DemoCNN(), (3, 32, 32)
    if name == "cheap":
        return NearlyFree(), (3, 32, 32)
    if name == "resnet50":
        return torchvision.models.resnet50(weights=None), (3, 224, 224)
    raise ValueError(f"unknown model {name!r}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_rates(runs: dict, draws: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Best draws/s of each run over `repeats` rounds; the runs alternate within a round, so a drift in the
    machine's speed touches all of them alike. One untimed warm-up round first."""
    times: dict[str, list[float]] = {label: [] for label in runs}
    for round_ in range(repeats + 1):
        for label, run in runs.items():
            started = time.perf_counter()
            run()
            sync(device)
            if round_:
                times[label].append(time.perf_counter() - started)
    return {label: draws / min(elapsed) for label, elapsed in times.items()}


def measure(name: str, device: torch.device, images: int, draws: int, batch: int, sigma: float,
            repeats: int, settings: dict) -> dict[str, float]:
    model, shape = make_model(name)
    torch.manual_seed(0)
    engine = Engine(model, device=device, batch_size=batch, **settings)
    x = torch.rand(images, *shape, device=device)
    total = images * draws
    batches = [min(batch, total - start) for start in range(0, total, batch)]
    layout = torch.channels_last if settings["channels_last"] else torch.contiguous_format
    dtype = PRECISIONS[settings["precision"]] or torch.float32
    fixed = torch.rand(batch, *shape, device=device).to(dtype).contiguous(memory_format=layout)
    noise = torch.empty(batch, *shape, device=device)
    noisy = torch.empty(batch, *shape, device=device, dtype=dtype).contiguous(memory_format=layout)

    def forward_only():
        for rows in batches:
            engine.logits(fixed[:rows]).argmax(1)

    def floor():
        for index, rows in enumerate(batches):
            torch.randn(noise[:rows].shape, out=noise[:rows])
            torch.add(x[index % images], noise[:rows], alpha=sigma, out=noisy[:rows])
            engine.logits(noisy[:rows]).argmax(1)

    ids = [f"bench/{i}" for i in range(images)]

    def engine_count():
        engine.count(x, ids, seed=0, requests=[Draws("estimation", sigma, draws)])

    looks = block_looks(min(100, draws), 1.5, draws)

    def engine_sequential():
        def procedure():
            for n in looks:
                yield Draws("estimation", sigma, n)

        engine.sequential(x, ids, 0, [procedure() for _ in ids])

    def per_image_loop():
        with torch.no_grad():
            for image in x:
                counts = np.zeros(10, dtype=int)
                remaining = draws
                while remaining:
                    rows = min(batch, remaining)
                    repeated = image.repeat((rows, 1, 1, 1))
                    predictions = engine.logits(repeated + torch.randn_like(repeated) * sigma).argmax(1)
                    for prediction in predictions.cpu().numpy():
                        counts[prediction] += 1
                    remaining -= rows

    runs = {"forward": forward_only, "floor": floor, "engine": engine_count, "sequential": engine_sequential,
            "per-image": per_image_loop}
    return best_rates(runs, total, repeats, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--models", nargs="+", default=["demo", "cheap"], help="demo, cheap, resnet50")
    parser.add_argument("--images", type=int, default=8, help="images per measurement (default 8)")
    parser.add_argument("--draws", type=int, default=5000, help="noise draws per image (default 5000)")
    parser.add_argument("--batch-size", type=int, default=1000, help="rows per forward pass (default 1000)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure; the best counts (default 3)")
    parser.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS), help="model precision")
    parser.add_argument("--channels-last", action="store_true", help="NHWC model and inputs")
    parser.add_argument("--compile", action="store_true", help="run the model through torch.compile")
    args = parser.parse_args()
    device = torch.device(args.device)
    settings = {"precision": args.precision, "channels_last": args.channels_last, "compile": args.compile}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size}, {args.images} images x {args.draws} draws, {settings}\n")
    print("| model | forward draws/s | floor draws/s | engine draws/s | sequential draws/s | per-image draws/s "
          "| engine/forward | engine/floor | sequential/floor | engine/per-image | engine s/image at N=100k |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model in args.models:
        r = measure(model, device, args.images, args.draws, args.batch_size, 0.25, args.repeats, settings)
        print(f"| {model} | {r['forward']:,.0f} | {r['floor']:,.0f} | {r['engine']:,.0f} | {r['sequential']:,.0f} "
              f"| {r['per-image']:,.0f} | {r['engine'] / r['forward']:.3f} | {r['engine'] / r['floor']:.3f} "
              f"| {r['sequential'] / r['floor']:.3f} | {r['engine'] / r['per-image']:.2f} "
              f"| {100_100 / r['engine']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
