"""Denoiser training job: `python jobs/train_denoiser.py --config jobs/configs/denoiser_demo.yaml`, the same
options as `pipeline train-denoiser` (`ray job submit --working-dir . -- python jobs/train_denoiser.py ...`)."""

import argparse
import sys

from pipeline.cli import add_train_denoiser_arguments, train_denoiser_main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_train_denoiser_arguments(parser)
    sys.exit(train_denoiser_main(parser.parse_args()))
