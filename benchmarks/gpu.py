"""What one GPU does for this pipeline, in one table: raw speed, the engine, reproducibility and a Ray job.

    python benchmarks/gpu.py                       # a GPU: sized for under 6 minutes on one H200
    python benchmarks/gpu.py --tiny --device cpu   # a CPU smoke run in under a minute (not a performance figure)
    python benchmarks/gpu.py --skip-job --out gpu_table.md

--tiny swaps ResNet-50 for the demo CNN at 32x32 and every size for a tiny one (compile with the "eager"
backend: dynamo's tracing, no C++ compiler; the job eager only, on 2 images), so the whole script runs on
two CPU cores in about a minute.

Sections of the table (draws/s are noisy forward passes per second):
  forward   ResNet-50 (torchvision, random weights) at 224, channels_last, on a fixed batch: the ceiling;
  floor     fresh randn noise + add + cast + forward + argmax per batch: what any sampler must pay;
            both by batch size (256-2,048) in fp32 (IEEE), tf32 and bf16;
  engine    Session.count on a few images at batch_size "auto", eager and compiled (compile=True), in bf16
            and fp32 channels_last, against the best floor of its precision; "first call s" is the first
            count (the probe, the compilation and one pass of the work), "compile s" that less the probe and
            the work at the steady rate;
  counts    the demo CNN at sigma 0.5 on a few demo digits: votes that differ (half the L1 distance of the
            count vectors) between each batch size and the smallest, per precision; 0 is reproducible;
  job       a Ray job (`pipeline.distributed.certify.run`) on one GPU actor over a synthetic folder of JPEGs
            (imagenet_folder layout, 256x256, resize 256 / size 224, cohen n0 = 100, N = 10,000, bf16
            channels_last), eager and compiled, against the engine alone on the same decoded images in this
            process. Steady state on both sides: images per second from the first finished batch on (the job's
            from its results files' modification times), so Ray start-up, model loading, the probe and the
            compilation are excluded; the total wall time of the job is in the note.
Without Ray installed the job rows are skipped with a note; the rest still runs.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torchvision
from throughput import best_rates, size_runs, sync  # beside this script

from pipeline.engine import Draws, Engine

SIGMA = 0.25
PRECISION_ORDER = ("fp32", "tf32", "bf16")


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between a GPU run and the CPU smoke run."""

    model: str = "resnet50"
    shape: tuple = (3, 224, 224)
    batch_sizes: tuple = (256, 512, 1024, 2048)
    rows_per_size: int = 4096
    repeats: int = 3
    engine: tuple = (2, 10_000)  # images x draws per engine figure
    compile: bool | str = True
    counts: tuple = (6, 50_000)  # demo digits x draws
    count_sizes: tuple = (100, 1000, 4096, 16384)
    job_images: int = 16
    job_pixels: tuple = (256, 256, 224)  # JPEG side, resize, crop
    job_n: tuple = (100, 10_000)  # n0, N
    job_precision: str = "bf16"
    job_cpus: int = 4
    images_per_batch: int = 4
    engine_precisions: tuple = ("bf16", "fp32")
    job_compiled: bool = True  # also the compiled job


TINY = dict(model="demo_cnn", shape=(3, 32, 32), batch_sizes=(4, 16), rows_per_size=16, repeats=1,
            engine=(2, 32), compile="eager", counts=(2, 64), count_sizes=(7, 50), job_images=2,
            job_pixels=(40, 40, 32), job_n=(10, 100), job_precision="fp32", job_cpus=1, images_per_batch=1,
            engine_precisions=("fp32",), job_compiled=False)


def build_model(sizes: Sizes) -> torch.nn.Module:
    """The torchvision architecture with random weights (speed does not depend on them), or the demo CNN."""
    torch.manual_seed(0)
    if sizes.model == "demo_cnn":
        from pipeline.models import ModelSpec, load_model

        return load_model(ModelSpec())
    return getattr(torchvision.models, sizes.model)(weights=None)


def sweep(model: torch.nn.Module, device: torch.device, sizes: Sizes) -> tuple[list[dict], dict[str, tuple]]:
    """Forward and floor rows by precision and batch size; the best floor (draws/s, batch) of each precision."""
    rows, best = [], {}
    image = torch.rand(sizes.shape, device=device)
    for precision in PRECISION_ORDER:
        for size in sizes.batch_sizes:
            engine = Engine(model, device=device, batch_size=size, precision=precision, channels_last=True)
            passes = max(1, sizes.rows_per_size // size)
            runs = size_runs(engine, image, size, passes)
            rates = best_rates(runs, dict.fromkeys(runs, passes * size), sizes.repeats, device)
            for label, value in rates.items():
                rows.append(row(label, f"{sizes.model} {sizes.shape[1]}, channels_last", precision, size, value))
            if rates["floor"] > best.get(precision, (0, 0))[0]:
                best[precision] = (rates["floor"], size)
    return rows, best


def row(section: str, measure: str, precision: str, batch, value: float, unit: str = "draws/s",
        ratio: float | None = None, note: str = "") -> dict:
    return {"section": section, "measure": measure, "precision": precision, "batch": batch, "value": value,
            "unit": unit, "ratio": ratio, "note": note}


def engine_rows(model: torch.nn.Module, device: torch.device, sizes: Sizes, best: dict) -> list[dict]:
    """Session.count at batch_size "auto", eager and compiled, against the best floor of its precision."""
    rows = []
    images, draws = sizes.engine
    x = torch.rand(images, *sizes.shape, device=device)
    ids = [f"bench/{i}" for i in range(images)]
    for precision in sizes.engine_precisions:
        for compiled in (False, sizes.compile):
            engine = Engine(model, device=device, batch_size="auto", precision=precision, channels_last=True,
                            compile=compiled)

            def count(engine=engine):
                engine.session().count(x, ids, seed=0, requests=[Draws("estimation", SIGMA, draws)])

            started = time.perf_counter()
            count()
            sync(device)
            first = time.perf_counter() - started
            rate = best_rates({"engine": count}, {"engine": images * draws}, sizes.repeats, device)["engine"]
            probe_s = engine.probe["seconds"] if engine.probe else 0.0
            compile_s = max(0.0, first - probe_s - images * draws / rate) if compiled else 0.0
            floor, floor_size = best[precision]
            how = f"compiled ({compiled})" if compiled else "eager"
            ran = engine.settings()
            note = (f"vs best floor ({floor_size}); probe {probe_s:.1f} s; first call {first:.1f} s; "
                    f"compile {compile_s:.1f} s; tf32 {ran['tf32']}")
            if ran.get("compile_error"):
                note += f"; compile failed, ran eager: {ran['compile_error'][:80]}"
            rows.append(row("engine", f"Session.count, auto, {how}", precision, engine.batch_size, rate,
                            ratio=rate / floor, note=note))
    return rows


def demo_digits(count: int) -> torch.Tensor:
    from pipeline.config import validate
    from pipeline.data.preprocess import decode
    from pipeline.data.sources import list_images

    config = validate({"dataset": {"layout": "demo", "max": count},
                       "certifiers": [{"name": "cohen", "sigma": 0.5, "n0": 10, "n": 100}]})
    listing = list_images(config.dataset)
    decoded = [torch.from_numpy(decode(data, config.dataset.transform)) for data in listing["image"].to_pylist()]
    return torch.stack(decoded).float() / 255


def counts_rows(device: torch.device, sizes: Sizes) -> list[dict]:
    """Votes that differ between each batch size and the smallest, per precision (demo CNN, sigma 0.5)."""
    from pipeline.models import ModelSpec, load_model

    model = load_model(ModelSpec())
    images, draws = sizes.counts
    x = demo_digits(images)
    ids = [f"digit/{i}" for i in range(images)]
    request = Draws("estimation", 0.5, draws)
    rows = []
    for precision in PRECISION_ORDER:
        counts = {}
        for size in sizes.count_sizes:
            engine = Engine(model, device=device, batch_size=size, precision=precision)
            counts[size] = engine.session().count(x, ids, seed=0, requests=[request])[request]
        smallest = sizes.count_sizes[0]
        for size in sizes.count_sizes[1:]:
            differ = int(np.abs(counts[size] - counts[smallest]).sum()) // 2
            rows.append(row("counts", f"demo CNN, sigma 0.5, batch {size} vs {smallest}", precision, size,
                            differ, unit=f"votes differ (of {images * draws:,})"))
    return rows


def write_jpegs(root: str, images: int, side: int) -> None:
    """A synthetic `imagenet_folder`: n0000000{k}/img{i}.JPEG, random pixels, 4 classes."""
    from PIL import Image

    generator = np.random.default_rng(0)
    for i in range(images):
        folder = os.path.join(root, f"n0000000{i % 4}")
        os.makedirs(folder, exist_ok=True)
        pixels = generator.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"img{i}.JPEG"), quality=90)


def job_config(root: str, output: str, device: torch.device, sizes: Sizes, compiled) -> dict:
    _, resize, crop = sizes.job_pixels
    n0, n = sizes.job_n
    return {"run_id": f"gpu-bench-{'compiled' if compiled else 'eager'}", "output": output, "seed": 0,
            "batch_size": "auto", "images_per_batch": sizes.images_per_batch, "device": device.type,
            "precision": sizes.job_precision, "channels_last": True, "compile": compiled,
            "actors": {"count": 1, "gpus": 1 if device.type == "cuda" else 0, "cpus": sizes.job_cpus},
            "dataset": {"layout": "imagenet_folder", "root": root, "resize": resize, "size": crop, "mode": "RGB"},
            "model": {"name": sizes.model},
            "certifiers": [{"name": "cohen", "sigma": SIGMA, "n0": n0, "n": n}]}


def steady_rate(batches: list[tuple[float, int]]) -> float:
    """Images/s from the first finished batch on: (end time, images) pairs, in order of finishing."""
    batches = sorted(batches)
    if len(batches) < 2:
        return float("nan")
    return sum(images for _, images in batches[1:]) / (batches[-1][0] - batches[0][0])


def engine_alone(config, device: torch.device) -> float:
    """The engine in this process on the job's decoded images, `images_per_batch` at a time, as the actor
    runs them (same model, settings and threads); steady images/s."""
    from pipeline.certification import certify_rows
    from pipeline.data.preprocess import decode
    from pipeline.data.sources import list_images, read_encoded
    from pipeline.models import load_model

    listing = list_images(config.dataset)
    images = torch.stack([torch.from_numpy(decode(data, config.dataset.transform))
                          for data in read_encoded(config.dataset, listing)])
    labels, ids = listing["label"].to_pylist(), listing["image_id"].to_pylist()
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, math.floor(config.actors.cpus)))
    engine = Engine(load_model(config.model), device=device, batch_size=config.batch_size,
                    precision=config.precision, channels_last=config.channels_last, compile=config.compile)
    batches = []
    try:
        for first in range(0, len(ids), config.images_per_batch):
            chunk = slice(first, first + config.images_per_batch)
            certify_rows(engine, images[chunk].float() / 255, labels[chunk], config.certifiers, seed=0,
                         image_ids=ids[chunk])
            sync(device)
            batches.append((time.perf_counter(), len(ids[chunk])))
    finally:
        torch.set_num_threads(threads)
    return steady_rate(batches)


def job_rate(summary) -> float:
    """The job's steady images/s, from the modification times of its results files (one per batch)."""
    import pyarrow.parquet as pq

    folder = os.path.join(summary.location.path, "results")
    batches = []
    for name in os.listdir(folder):
        if name.endswith(".parquet"):
            path = os.path.join(folder, name)
            images = len(set(pq.read_table(path, columns=["image_id"])["image_id"].to_pylist()))
            batches.append((os.stat(path).st_mtime, images))
    return steady_rate(batches)


def job_rows(device: torch.device, sizes: Sizes) -> list[dict]:
    """A Ray job on one actor against the engine alone, eager and compiled; skipped without Ray."""
    try:
        import ray

        from pipeline.config import validate
        from pipeline.distributed.certify import run
    except ImportError as error:
        return [row("job", "Ray job vs engine alone", sizes.job_precision, "auto", float("nan"), unit="images/s",
                    note=f"skipped: Ray cannot be imported ({error})")]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root, output = os.path.join(scratch, "images"), os.path.join(scratch, "runs")
        write_jpegs(root, sizes.job_images, sizes.job_pixels[0])
        for compiled in (False, sizes.compile) if sizes.job_compiled else (False,):
            config = validate(job_config(root, output, device, sizes, compiled))
            alone = engine_alone(config, device)
            started = time.perf_counter()
            summary = run(config)
            total = time.perf_counter() - started
            rate = job_rate(summary)
            how = f"compiled ({compiled})" if compiled else "eager"
            note = (f"{sizes.job_images} images, cohen n0 = {sizes.job_n[0]}, N = {sizes.job_n[1]:,}; engine alone "
                    f"{alone:.3f} images/s; job total {total:.0f} s, status {summary.status}")
            rows.append(row("job", f"Ray job, 1 {device.type} actor, {how}", sizes.job_precision, "auto", rate,
                            unit="images/s", ratio=rate / alone, note=note))
        ray.shutdown()
    if len(rows) > 1:
        rows[-1]["note"] += f"; {rows[-1]['value'] / rows[0]['value']:.2f}x the eager job"
    return rows


def fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return "n/a"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3f}" if value < 10 else f"{value:.1f}"


def table(header: str, rows: list[dict]) -> str:
    lines = [header, "", "| section | measure | precision | batch | value | unit | ratio | note |",
             "|---|---|---|---:|---:|---|---:|---|"]
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f}"
        batch = fmt(r["batch"]) if isinstance(r["batch"], int) else r["batch"]
        lines.append(f"| {r['section']} | {r['measure']} | {r['precision']} | {batch} | {fmt(r['value'])} "
                     f"| {r['unit']} | {ratio} | {r['note']} |")
    return "\n".join(lines) + "\n"


def progress(section: str, started: float) -> None:
    print(f"{section} done at {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized: the demo CNN at 32x32, tiny batches and draws")
    parser.add_argument("--skip-job", action="store_true", help="leave out the Ray job rows")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    sizes = Sizes(**TINY) if args.tiny else Sizes()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    header = (f"device {device} ({name}), torch {torch.__version__}, Python {platform.python_version()}, "
              f"{torch.get_num_threads()} threads; {sizes.model} at {sizes.shape[1]}, sigma {SIGMA}, channels_last; "
              f"batches {list(sizes.batch_sizes)}, best of {sizes.repeats} after a warm-up; "
              f"engine {sizes.engine[0]} images x {sizes.engine[1]:,} draws; compile={sizes.compile!r}"
              f"{'; --tiny: not a performance figure' if args.tiny else ''}")
    print(header, file=sys.stderr, flush=True)
    started = time.perf_counter()
    model = build_model(sizes)
    rows, best = sweep(model, device, sizes)
    progress("sweep", started)
    rows += engine_rows(model, device, sizes, best)
    progress("engine", started)
    rows += counts_rows(device, sizes)
    progress("counts", started)
    if not args.skip_job:
        rows += job_rows(device, sizes)
        progress("job", started)
    text = table(header, rows)
    print(text, end="")
    if args.out:
        with open(args.out, "w") as file:
            file.write(text)


if __name__ == "__main__":
    main()
