"""Trains a base classifier with noise augmentation (Gaussian or splitting noise), in this process or on Ray
Train, and writes it in the published checkpoint layout:

    python jobs/train_classifier.py --config jobs/configs/train_cifar10.yaml [--set arch=cifar_wrn40_10] \
        [--set 'noise=[dssn:0.5]'] [--set workers=2 --set use_gpu=true] [--output runs/classifiers/mine]

`ray job submit --working-dir . -- python jobs/train_classifier.py ...` runs it on a cluster. Certify the
result with `model: {weights: <output>/checkpoint.pth.tar}` (its `arch` and normalisation are read back).
"""

import argparse
import logging
import sys

from pipeline.config import read_yaml
from pipeline.train_classifier import ClassifierTraining


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, metavar="FILE", help="YAML classifier training configuration")
    parser.add_argument("--output", metavar="URI", help="directory or s3://bucket/prefix for the checkpoint")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. arch=cifar_resnet20 or epochs=1 (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        data = read_yaml(args.config, args.set)
        if args.output:
            data["output"] = args.output
        config = ClassifierTraining.from_dict(data)
    except ValueError as error:
        print(f"train_classifier: invalid configuration: {error}", file=sys.stderr)
        return 2
    if config.workers:
        from pipeline.distributed.train_classifier import train_classifier

        uri = train_classifier(config)
    else:
        from pipeline.train_classifier import fit_local

        uri = fit_local(config)
    print(f"classifier: {uri}\ncertify with it: --set model.weights={uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
