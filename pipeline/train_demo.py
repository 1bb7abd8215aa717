"""Trains the demo CNN on the demo set's train split with noise augmentation (`jobs/train_demo_model.py`).

Training on the noise the classifier will be smoothed with is what makes the smoothed classifier
accurate. The demo model serves both threat models: each batch is split in equal shares between the given
noises (by default Gaussian noise at sigma 0.25, for the l2 certifiers, and DSSN splitting noise at sigma
0.5 with the reference template, for the l1 certifiers; "none" trains on clean images). Inputs are shifted
by whole pixels, which keeps the 1/255 grid. The run is seeded; it logs test accuracy under each noise.
The published CIFAR architectures train with `pipeline train-classifier`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.data.demo import load_demo
from pipeline.models.demo import WEIGHTS, DemoCNN
from pipeline.train_classifier import training_noise

log = logging.getLogger("train_demo_model")

DEFAULT_NOISE = ("gaussian:0.25", "dssn:0.5")

__all__ = ["DEFAULT_NOISE", "accuracy", "train_demo_model"]


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, noise) -> float:
    """Top-1 accuracy of `model` on noise(images)."""
    model.eval()
    with torch.inference_mode():
        return float((model(noise(images)).argmax(1) == labels).float().mean())


def _split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images in [0, 1], labels) of one split of the demo set."""
    pixels, labels, _ = load_demo(split)
    return pixels.float() / 255, labels


def _epoch(model, optimizer, schedule, images, labels, noises: dict, batch_size: int) -> torch.Tensor:
    """One pass over the train split in a random order; returns the last batch's loss."""
    model.train()
    for batch in torch.randperm(len(images)).split(batch_size):
        shift = torch.randint(-2, 3, (2,)).tolist()  # shifts by whole pixels keep the 1/255 grid
        clean = torch.roll(images[batch], shifts=shift, dims=(2, 3))
        shares = torch.arange(len(batch)) % len(noises)
        noisy = torch.empty_like(clean)
        for index, noise in enumerate(noises.values()):
            noisy[shares == index] = noise(clean[shares == index])
        loss = F.cross_entropy(model(noisy), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return loss


def train_demo_model(noise: Sequence[str] = DEFAULT_NOISE, epochs: int = 80, batch_size: int = 64, lr: float = 3e-3,
                     seed: int = 0, output: str | Path = WEIGHTS) -> Path:
    """Trains the demo CNN (seeded by `seed`) for `epochs` with a one-cycle Adam schedule peaking at `lr`, each
    batch split between the `noise` specs (KIND:SIGMA, or "none"); writes its weights to `output`, returned."""
    torch.manual_seed(seed)
    noises = {spec: training_noise(spec) for spec in noise}
    images, labels = _split("train")
    test_images, test_labels = _split("test")
    model = DemoCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-len(images) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    for epoch in range(epochs):
        loss = _epoch(model, optimizer, schedule, images, labels, noises, batch_size)
        if (epoch + 1) % 20 == 0:
            scores = ", ".join(f"{spec} {accuracy(model, test_images, test_labels, noise):.3f}"
                               for spec, noise in noises.items())
            log.info("epoch %d: loss %.3f; test accuracy clean %.3f, %s", epoch + 1, loss.item(),
                     accuracy(model, test_images, test_labels, lambda x: x), scores)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.eval().state_dict(), output)
    log.info("wrote %s", output)
    return output
