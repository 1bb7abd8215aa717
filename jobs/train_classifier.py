"""Trains a base classifier with noise augmentation (Gaussian or splitting noise), in this process or on Ray
Train, and writes it in the published checkpoint layout; the same options as `pipeline train-classifier`:

    python jobs/train_classifier.py --config jobs/configs/train_cifar10.yaml [--set arch=cifar_wrn40_10] \
        [--set 'noise=[dssn:0.5]'] [--set workers=2 --set use_gpu=true] [--output runs/classifiers/mine]

`ray job submit --working-dir . -- python jobs/train_classifier.py ...` runs it on a cluster. Certify the
result with `model: {weights: <output>/checkpoint.pth.tar}` (its `arch` and normalisation are read back).
"""

import argparse
import sys

from pipeline.cli import add_train_classifier_arguments, train_classifier_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_classifier_arguments(parser)
    return train_classifier_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
