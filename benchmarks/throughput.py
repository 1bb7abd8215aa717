"""Engine throughput against the best the machine can do with the same model, in one run.

    python benchmarks/throughput.py                                  # CPU: demo CNN, CIFAR ResNet-110, ResNet-50
    python benchmarks/throughput.py --models demo --threads 1 2
    python benchmarks/throughput.py --device cuda --models resnet50 --channels-last [--precision bf16]

For each model and thread count it first sweeps the batch size, measuring noise draws per second of
  forward     the model alone on a fixed batch (no noise): the ceiling;
  floor       fresh Gaussian noise, the add and the forward per batch: what any sampler must pay;
and takes the batch size of the best floor as the baseline's. Then, at `batch_size="auto"` (the engine's
own timed probe, `pipeline.batch_probe`), it measures in alternating rounds the floor at that best size and
  engine      pipeline's Session.count on several images (seeded blocks, packing, on-device counting);
  sequential  Session.sequential on the same draws asked for in looks (100, x1.5, ..., in whole blocks);
  per-image   a per-image loop as in the reference code (one image per call, randn_like noise, a host sync
              and counting on the host per batch), at the same batch;
and prints each against the best floor, with the engine's seconds per image at n0 + N = 100,100.
Every figure is the best of --repeats rounds in which the runs alternate, after an untimed warm-up round.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
import torchvision

from pipeline.certifiers.sequential import block_looks
from pipeline.engine import PRECISIONS, Draws, Engine
from pipeline.models import DemoCNN
from pipeline.models.cifar import CifarResNet

SIGMA = 0.25
# model: (build, input shape, batch sizes swept on a CPU, images x draws for the engine runs)
MODELS = {
    "demo": (DemoCNN, (3, 32, 32), [16, 32, 64, 128, 256, 512, 1024], (8, 2000)),
    "cifar_resnet110": (lambda: CifarResNet(110, 10), (3, 32, 32), [4, 8, 16, 32, 64, 128], (2, 128)),
    "resnet50": (lambda: torchvision.models.resnet50(weights=None), (3, 224, 224), [1, 2, 4, 8, 16], (2, 16)),
}


def rate(value: float) -> str:
    """Draws/s for a table: whole numbers, one decimal below 100."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_rates(runs: dict, draws: dict[str, int], repeats: int, device: torch.device) -> dict[str, float]:
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
    return {label: draws[label] / min(elapsed) for label, elapsed in times.items()}


def sweep(engine: Engine, shape: tuple, sizes: list[int], rows_per_size: int, repeats: int) -> dict[int, dict]:
    """Forward and floor draws/s at each batch size, each over at least `rows_per_size` rows."""
    image = torch.rand(shape, device=engine.device)
    results = {}
    for size in sizes:
        passes = max(1, rows_per_size // size)
        runs = size_runs(engine, image, size, passes)
        results[size] = best_rates(runs, dict.fromkeys(runs, passes * size), repeats, engine.device)
    return results


def size_runs(engine: Engine, image: torch.Tensor, size: int, passes: int) -> dict:
    """The forward-only and the floor run: `passes` batches of `size` rows each."""
    device, shape = engine.device, tuple(image.shape)
    dtype = PRECISIONS[engine.precision] or torch.float32
    layout = torch.channels_last if engine.channels_last else torch.contiguous_format
    fixed = torch.rand(size, *shape, device=device).to(dtype).contiguous(memory_format=layout)
    noise = torch.empty(size, *shape, device=device)
    noisy = torch.empty(size, *shape, device=device, dtype=dtype).contiguous(memory_format=layout)

    def forward_only():
        for _ in range(passes):
            engine.logits(fixed).argmax(1)

    def floor():
        for _ in range(passes):
            torch.randn(noise.shape, out=noise)
            torch.add(image, noise, alpha=SIGMA, out=noisy)
            engine.logits(noisy).argmax(1)

    return {"forward": forward_only, "floor": floor}


def engine_rates(engine: Engine, shape: tuple, images: int, draws: int, repeats: int,
                 floor_size: int) -> dict[str, float]:
    """Session.count, Session.sequential and a per-image loop at the engine's batch size, and the floor at
    `floor_size` in the same rounds, draws/s."""
    device = engine.device
    x = torch.rand(images, *shape, device=device)
    ids = [f"bench/{i}" for i in range(images)]
    looks = block_looks(min(100, draws), 1.5, draws)

    def engine_count():
        engine.session().count(x, ids, seed=0, requests=[Draws("estimation", SIGMA, draws)])

    def engine_sequential():
        def procedure():
            for n in looks:
                yield Draws("estimation", SIGMA, n)

        engine.session().sequential(x, ids, 0, [procedure() for _ in ids])

    def per_image_loop():
        for image in x:
            counts = np.zeros(1000, dtype=int)
            remaining = draws
            while remaining:
                rows = min(engine.batch_size, remaining)
                repeated = image.repeat((rows, 1, 1, 1))
                predictions = engine.logits(repeated + torch.randn_like(repeated) * SIGMA).argmax(1)
                for prediction in predictions.cpu().numpy():
                    counts[prediction] += 1
                remaining -= rows

    engine_count()  # the probe runs here, outside the timing
    passes = max(1, images * draws // floor_size)
    runs = {"floor": size_runs(engine, x[0], floor_size, passes)["floor"], "engine": engine_count,
            "sequential": engine_sequential, "per-image": per_image_loop}
    return best_rates(runs, {**dict.fromkeys(runs, images * draws), "floor": passes * floor_size}, repeats, device)


def measure(name: str, device: torch.device, threads: int, repeats: int, settings: dict) -> dict:
    build, shape, sizes, (images, draws) = MODELS[name]
    if device.type == "cuda":
        sizes = [size * 16 for size in sizes]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build()
    fixed = Engine(model, device=device, batch_size=sizes[0], **settings)
    swept = sweep(fixed, shape, sizes, max(sizes), repeats)
    print(f"\n{name} {shape}, {threads} thread(s): draws/s by batch size\n")
    print("| batch | forward | floor |\n|---:|---:|---:|")
    for size, rates in swept.items():
        print(f"| {size} | {rate(rates['forward'])} | {rate(rates['floor'])} |", flush=True)
    best_size = max(swept, key=lambda size: swept[size]["floor"])
    auto = Engine(model, device=device, batch_size="auto", **settings)
    rates = engine_rates(auto, shape, images, draws, repeats, best_size)
    return {"model": name, "threads": threads, "best_forward": max(r["forward"] for r in swept.values()),
            "best_size": best_size, "best_floor": rates.pop("floor"), "auto": auto.batch_size, **rates,
            "probe_s": auto.probe["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to measure")
    parser.add_argument("--threads", nargs="+", type=int, default=[torch.get_num_threads()],
                        help="torch thread counts to measure (default: torch's default)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure; the best counts (default 3)")
    parser.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS), help="model precision")
    parser.add_argument("--channels-last", action="store_true", help="NHWC model and inputs")
    args = parser.parse_args()
    device = torch.device(args.device)
    settings = {"precision": args.precision, "channels_last": args.channels_last}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, sigma {SIGMA}, {settings}")
    summary = [measure(model, device, threads, args.repeats, settings)
               for model in args.models for threads in args.threads]
    print("\n| model | threads | best forward | best floor (batch) | auto batch (probe s) | engine | sequential "
          "| per-image | engine/best floor | sequential/best floor | engine/per-image | engine s/image at N=100k |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in summary:
        print(f"| {r['model']} | {r['threads']} | {rate(r['best_forward'])} "
              f"| {rate(r['best_floor'])} ({r['best_size']}) "
              f"| {r['auto']} ({r['probe_s']:.2f}) | {rate(r['engine'])} | {rate(r['sequential'])} "
              f"| {rate(r['per-image'])} | {r['engine'] / r['best_floor']:.3f} "
              f"| {r['sequential'] / r['best_floor']:.3f} "
              f"| {r['engine'] / r['per-image']:.2f} | {100_100 / r['engine']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
