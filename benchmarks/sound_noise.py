"""The sound Gaussian noise on the 1/255 grid against the real-valued one: speed, and the demo's accuracy.

    python benchmarks/sound_noise.py speed [--device cuda] [--draws 512] [--resnet-draws 64] [--threads 1]
    python benchmarks/sound_noise.py accuracy [--config jobs/configs/demo.yaml] [--images 30]

`speed`: draws per second of `Session.count` (noise, add, cast, forward, count: the engine's whole work)
with `noise="sound_gaussian"` and with `"gaussian"`, on the demo CNN (3x32x32) and ResNet-50 at 224, the
same 8-bit images and batch size for both, best of `--repeats` alternating rounds; and the noise alone
(fill + apply of one block, no model), which says where the time goes. Prints the ratios sound / real.

`accuracy`: the config's Gaussian certifiers (cohen, topk, center, smooth_reduce) on the config's demo
digits (its skip and max; at most `--images`) in this process, once with the sound noise (what
`gaussian: auto` gives 8-bit images) and once with `gaussian: real`, same seed; prints the
certified-accuracy table of both and, per setting, how the radii moved (center: certified images and
eps_out).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
import torchvision
from throughput import best_rates  # beside this script

from pipeline import report
from pipeline.certification import certify_rows
from pipeline.certifiers.base import ESTIMATION, GaussianNoise
from pipeline.config import load_config
from pipeline.data.demo import load_demo
from pipeline.engine import Draws, Engine
from pipeline.models import load_model
from pipeline.models.demo import load_demo_model
from pipeline.noise import DRAWS_PER_BLOCK, make_noise
from pipeline.results import to_table

KINDS = ("gaussian", "sound_gaussian")


def noise_call(shape: tuple, kind: str, device: torch.device):
    """One block of the noise: fill, then apply to an 8-bit image (a fresh block each call)."""
    stream = make_noise(kind, shape, device, 0.25)
    image = (torch.randint(0, 256, shape, device=device).float() / 255)
    block = torch.empty((DRAWS_PER_BLOCK, *shape), device=device)
    counter = iter(range(10**9))

    def run():
        stream.fill(block, 0, "bench", ESTIMATION, next(counter))
        stream.apply(image, block)

    return run


def engine_call(model, shape: tuple, kind: str, draws: int, batch: int, device: torch.device):
    """`Session.count` of `draws` draws on each of 2 images of `shape` (on the 1/255 grid)."""
    engine = Engine(model, device=str(device), batch_size=batch)
    images = torch.randint(0, 256, (2, *shape), generator=torch.Generator().manual_seed(0)).float() / 255
    request = Draws(ESTIMATION, 0.25, draws, noise=kind)
    return lambda: engine.session().count(images, ["a", "b"], 0, [request])


def speed(args) -> None:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {"demo_cnn": (load_demo_model, (3, 32, 32), args.draws, 256),
              "resnet50": (lambda: torchvision.models.resnet50(weights=None), (3, 224, 224), args.resnet_draws, 32)}
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, sigma 0.25, "
          f"best of {args.repeats} alternating rounds")
    print("| model | draws | batch | noise alone, real (draws/s) | sound | ratio | engine, real (draws/s) | sound "
          "| ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        make, shape, draws, batch = models[name]
        model = make().to(device).eval()
        alone = best_rates({kind: noise_call(shape, kind, device) for kind in KINDS},
                           dict.fromkeys(KINDS, DRAWS_PER_BLOCK), args.repeats, device)
        rates = best_rates({kind: engine_call(model, shape, kind, draws, batch, device) for kind in KINDS},
                           dict.fromkeys(KINDS, 2 * draws), args.repeats, device)
        real, sound = "gaussian", "sound_gaussian"
        print(f"| {name} | {2 * draws} | {batch} | {alone[real]:,.0f} | {alone[sound]:,.0f} | "
              f"{alone[sound] / alone[real]:.3f} | {rates[real]:,.1f} | {rates[sound]:,.1f} | "
              f"{rates[sound] / rates[real]:.3f} |", flush=True)


def accuracy(args) -> None:
    config = load_config(args.config, [])
    sound = [c for c in config.certifiers if isinstance(c, GaussianNoise)]
    real = [dataclasses.replace(c, gaussian="real") for c in sound]
    model = load_model(config.model, config.storage)
    pixels, labels, ids = load_demo(config.dataset.split)
    last = len(ids) if config.dataset.max is None else min(len(ids), config.dataset.max)
    keep = list(range(0, last, config.dataset.skip))[: args.images]  # the config's subsample
    images, labels, ids = pixels[keep].float() / 255, labels[keep].tolist(), [ids[i] for i in keep]
    tables = []
    for certifiers in (sound, real):
        started = time.perf_counter()
        engine = Engine(model, batch_size=args.batch_size)
        tables.append(to_table(certify_rows(engine, images, labels, certifiers, seed=config.seed, image_ids=ids)))
        print(f"{certifiers[0].gaussian}: {time.perf_counter() - started:.0f} s", flush=True)
    both = pa.concat_tables(tables)
    frame = report.accuracy_table(report.combined_rows([report.Source("demo", both)]), "l2", args.radii)
    print(report._markdown(frame, floatfmt=".3f"))
    changes(*(table.to_pandas() for table in tables))


def changes(sound: pd.DataFrame, real: pd.DataFrame) -> None:
    """Per setting, how the certificates moved from real to sound noise; the rows of both runs are in the same
    order (image by image, certifier by certifier)."""
    for name, group in sound.groupby("setting", sort=False):
        other = real.loc[group.index]
        if group["kind"].iloc[0] == "output":
            print(f"{name}: certified {int(group['eps_out'].notna().sum())} (sound) vs "
                  f"{int(other['eps_out'].notna().sum())} (real) images, median eps_out "
                  f"{group['eps_out'].median():.3f} vs {other['eps_out'].median():.3f}")
            continue
        delta = (group["radius"].to_numpy() - other["radius"].to_numpy())
        moved = int((group["prediction"].to_numpy() != other["prediction"].to_numpy()).sum())
        print(f"{name}: |radius(sound) - radius(real)| median {np.median(np.abs(delta)):.4f}, max "
              f"{np.abs(delta).max():.4f}; prediction differs on {moved} of {len(group)} images")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    fast = commands.add_parser("speed", help="draws per second, sound against real noise")
    fast.add_argument("--device", default="cpu")
    fast.add_argument("--draws", type=int, default=512, help="draws per image on the demo CNN (2 images)")
    fast.add_argument("--resnet-draws", type=int, default=64, help="draws per image on ResNet-50 (2 images)")
    fast.add_argument("--repeats", type=int, default=3)
    fast.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    fast.add_argument("--models", nargs="+", default=["demo_cnn", "resnet50"], choices=["demo_cnn", "resnet50"])
    table = commands.add_parser("accuracy", help="certified accuracy of a demo config, sound against real noise")
    table.add_argument("--config", type=Path, default=Path("jobs/configs/demo.yaml"))
    table.add_argument("--images", type=int, default=30, help="at most N of the config's digits")
    table.add_argument("--batch-size", type=int, default=256)
    table.add_argument("--radii", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    args = parser.parse_args()
    (speed if args.command == "speed" else accuracy)(args)


if __name__ == "__main__":
    main()
