"""Trains the demo CNN on the demo set's train split with noise augmentation (`pipeline.train_demo`).

    python jobs/train_demo_model.py            # writes pipeline/models/weights/demo_cnn.pt
"""

import argparse
import logging
from pathlib import Path

from pipeline.models.demo import WEIGHTS
from pipeline.train_demo import DEFAULT_NOISE, train_demo_model

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--noise", nargs="+", default=list(DEFAULT_NOISE), metavar="KIND:SIGMA",
                        help="training noises, each on an equal share of every batch (default gaussian:0.25 "
                             "dssn:0.5; 'none' trains on clean images)")
    parser.add_argument("--epochs", type=int, default=80, help="passes over the train split (default 80)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak Adam learning rate, one-cycle (default 3e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed for initialisation, order and noise (default 0)")
    parser.add_argument("--output", type=Path, default=WEIGHTS, help=f"where to write the weights (default {WEIGHTS})")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train_demo_model(args.noise, args.epochs, args.batch_size, args.lr, args.seed, args.output)
