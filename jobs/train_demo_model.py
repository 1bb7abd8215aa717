"""Trains the demo CNN on the demo set's train split with noise augmentation.

    python jobs/train_demo_model.py            # writes pipeline/models/weights/demo_cnn.pt

Training on the noise the classifier will be smoothed with is what makes the smoothed classifier
accurate. The demo model serves both threat models: each batch is split between Gaussian noise
(sigma 0.25, for the l2 certifiers) and DSSN splitting noise (sigma 0.5, the reference template, for the
l1 certifiers), as `--noise` says. The run is seeded; it prints test accuracy under each noise.
The published CIFAR architectures train with `jobs/train_classifier.py`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.data.demo import load_demo
from pipeline.models.demo import WEIGHTS, DemoCNN
from pipeline.train_classifier import training_noise

log = logging.getLogger("train_demo_model")


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, noise) -> float:
    model.eval()
    with torch.inference_mode():
        return float((model(noise(images)).argmax(1) == labels).float().mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--noise", nargs="+", default=["gaussian:0.25", "dssn:0.5"], metavar="KIND:SIGMA",
                        help="training noises, each on an equal share of every batch (default gaussian:0.25 "
                             "dssn:0.5; 'none' trains on clean images)")
    parser.add_argument("--epochs", type=int, default=80, help="passes over the train split (default 80)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak Adam learning rate, one-cycle (default 3e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed for initialisation, order and noise (default 0)")
    parser.add_argument("--output", type=Path, default=WEIGHTS, help=f"where to write the weights (default {WEIGHTS})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    torch.manual_seed(args.seed)
    noises = {spec: training_noise(spec) for spec in args.noise}
    images, labels, _ = load_demo("train")
    images = images.float() / 255
    test_images, test_labels, _ = load_demo("test")
    test_images = test_images.float() / 255
    model = DemoCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps = args.epochs * -(-len(images) // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps)
    for epoch in range(args.epochs):
        model.train()
        for batch in torch.randperm(len(images)).split(args.batch_size):
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
        if (epoch + 1) % 20 == 0:
            scores = ", ".join(f"{spec} {accuracy(model, test_images, test_labels, noise):.3f}"
                               for spec, noise in noises.items())
            log.info("epoch %d: loss %.3f; test accuracy clean %.3f, %s", epoch + 1, loss.item(),
                     accuracy(model, test_images, test_labels, lambda x: x), scores)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.eval().state_dict(), args.output)
    log.info("wrote %s", args.output)


if __name__ == "__main__":
    main()
