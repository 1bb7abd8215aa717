"""Denoised smoothing from about 1% of the data: no denoiser, Salman's Stab, DE-CROP white-box and black-box.

    python benchmarks/denoiser_experiment.py

A demo classifier trained without noise (the target) and a second one with another seed (the black-box
surrogate) are trained first. Every denoiser then gets the same subset (2 images per class of the demo
train split, 1.3%: one per class for training, one held out for checkpoint selection), the same DnCNN
(depth 5, 16 channels), the same epoch budget and learning rate. All are certified with Cohen's CERTIFY
at sigma 0.25 (n0 = 100, n = 1000, alpha = 0.001) on the same 100 test digits.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import pipeline
from pipeline import report
from pipeline.certifiers import Cohen
from pipeline.config import DenoiserConfig
from pipeline.data.demo import load_demo
from pipeline.denoise.train import fit_local
from pipeline.models import ModelSpec, load_model
from pipeline.models.denoisers import load_denoiser
from pipeline.train_demo import train_demo_model

RADII = (0.0, 0.25, 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100, help="test digits to certify (default 100)")
    parser.add_argument("--epochs", type=int, default=150, help="epochs of the first stage (default 150)")
    parser.add_argument("--second-epochs", type=int, default=50, help="epochs of the second stage (default 50)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as scratch:
        target, surrogate = Path(scratch, "target.pt"), Path(scratch, "surrogate.pt")
        train_demo_model(noise=["none"], epochs=40, seed=0, output=target)
        train_demo_model(noise=["none"], epochs=40, seed=1, output=surrogate)
        base = {"classifier": {"name": "demo_cnn", "weights": str(target)}, "sigma": 0.25,
                "denoiser": {"depth": 5, "channels": 16}, "subset": {"per_class": 2, "seed": 3, "validation": 0.5},
                "epochs": args.epochs, "second_epochs": args.second_epochs, "batch_size": 10, "lr": 1e-3,
                "second_lr": 1e-3, "output": str(Path(scratch, "denoisers"))}
        variants = {
            "Stab (Salman et al.)": {"objective": "stab", "epochs": args.epochs + args.second_epochs,
                                     "second_epochs": 0},
            "DE-CROP, white-box": {"objective": "decrop"},
            "DE-CROP, black-box": {"objective": "decrop", "access": "black_box",
                                   "surrogate": {"name": "demo_cnn", "weights": str(surrogate)}},
        }
        denoisers = {name: fit_local(DenoiserConfig.from_dict({**base, **settings, "run_name": f"run{i}"}))
                     for i, (name, settings) in enumerate(variants.items())}

        images, labels, ids = load_demo("test")
        images, labels, ids = images[: args.images].float() / 255, labels[: args.images], ids[: args.images]
        certifier = Cohen(sigma=0.25, n0=100, n=1000, alpha=0.001)
        models = {"no denoiser": ModelSpec("demo_cnn", weights=str(target)),
                  **{name: ModelSpec("demo_cnn", weights=str(target), denoiser=uri) for name, uri in denoisers.items()}}
        print(f"\n{args.images} demo test digits, sigma 0.25, n0 = 100, n = 1000, alpha = 0.001; classifier trained "
              f"without noise; denoisers from 20 train images ({args.epochs} + {args.second_epochs} epochs)\n")
        print("| model | " + " | ".join(f"r = {r:g}" for r in RADII) + " | checkpoint selected (epoch, phase, "
              "validation accuracy) |")
        print("|---|" + "---:|" * len(RADII) + "---|")
        for name, spec in models.items():
            table = pipeline.certify(load_model(spec), images, labels, [certifier], image_ids=ids)
            accuracy = report.certified_accuracy(table, RADII).iloc[0].tolist()
            selected = ""
            if spec.denoiser:
                metrics = load_denoiser(spec.denoiser)[1]["metrics"]
                selected = f"{metrics['epoch']}, {metrics['phase']}, {metrics['val_accuracy']:.1f}"
            print(f"| {name} | " + " | ".join(f"{value:.2f}" for value in accuracy) + f" | {selected} |", flush=True)


if __name__ == "__main__":
    main()
