"""Trains the demo CNN on the demo set's train split with Gaussian noise augmentation.

    python jobs/train_demo_model.py                      # writes pipeline/models/weights/demo_cnn_sigma0.25.pt

Training on noisy copies (x + N(0, sigma^2 I)) is what makes the smoothed classifier accurate
(Cohen et al. 2019). The run is seeded; it prints clean and noisy accuracy on the test split.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.data.demo import load_demo
from pipeline.models.demo import WEIGHTS, DemoCNN

log = logging.getLogger("train_demo_model")


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, sigma: float) -> float:
    model.eval()
    with torch.inference_mode():
        noisy = images + sigma * torch.randn_like(images)
        return float((model(noisy).argmax(1) == labels).float().mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sigma", type=float, default=0.25, help="noise scale of the augmentation (default 0.25)")
    parser.add_argument("--epochs", type=int, default=60, help="passes over the train split (default 60)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate, cosine-annealed (default 3e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed for initialisation, order and noise (default 0)")
    parser.add_argument("--output", type=Path, default=WEIGHTS, help=f"where to write the weights (default {WEIGHTS})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    torch.manual_seed(args.seed)
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
            x = images[batch]
            shift = torch.randint(-2, 3, (2,)).tolist()
            x = torch.roll(x, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(x + args.sigma * torch.randn_like(x)), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if (epoch + 1) % 10 == 0:
            log.info("epoch %d: loss %.3f, test accuracy clean %.3f, under noise %.3f", epoch + 1, loss.item(),
                     accuracy(model, test_images, test_labels, 0.0),
                     accuracy(model, test_images, test_labels, args.sigma))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.eval().state_dict(), args.output)
    log.info("wrote %s", args.output)


if __name__ == "__main__":
    main()
