"""The command line.

Examples:
  pipeline certify --config jobs/configs/demo.yaml
  pipeline certify --config jobs/configs/imagenet.yaml --output s3://bucket/runs --set model.weights=/ckpt/rn50.pt
  pipeline report runs/demo
  pipeline train-denoiser --config jobs/configs/denoiser_demo.yaml --set objective=decrop
  pipeline sweep --config jobs/configs/sweep_demo.yaml
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.config import ConfigError, load_config
from pipeline.data.sources import DatasetError
from pipeline.lease import RunBusy
from pipeline.run import IncompleteRun
from pipeline.storage import StorageError, StorageOutage

log = logging.getLogger("pipeline")


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def add_certify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="YAML run configuration")
    parser.add_argument("--output", metavar="URI", help="directory or s3://bucket/prefix for runs (overrides `output`)")
    parser.add_argument("--run-id", metavar="ID", help="name of this run (overrides `run_id`); re-running an id "
                                                       "resumes it")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, dotted keys and YAML values, e.g. certifiers.0.sigma=0.5 "
                             "(repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")


def certify_main(args: argparse.Namespace) -> int:
    """Runs `pipeline certify`; configuration, storage and dataset problems exit with status 2 before any work."""
    _logging(args.verbose)
    try:
        config = load_config(args.config, args.set, output=args.output, run_id=args.run_id)
        from pipeline.distributed.certify import run

        uri = run(config)
    except (IncompleteRun, RunBusy, StorageOutage) as error:
        print(f"pipeline: {error}", file=sys.stderr)
        return 1
    except (ConfigError, StorageError, DatasetError, ValueError) as error:
        if args.verbose:
            raise
        print(f"pipeline: {'invalid configuration: ' if isinstance(error, ConfigError) else ''}{error}",
              file=sys.stderr)
        return 2

    print(config.storage.open(uri).join("report").read_bytes("summary.md").decode())
    print(f"results: {uri}/results  report: {uri}/report")
    return 0


def report_main(args: argparse.Namespace) -> int:
    _logging(args.verbose)
    from pipeline import report
    from pipeline.results import read_results
    from pipeline.storage import Storage

    run = Storage(endpoint_url=args.endpoint_url).open(args.run)
    results = read_results(run.join("results"))
    if results.num_rows == 0:
        print(f"pipeline: no results under {run.uri}/results", file=sys.stderr)
        return 2
    print(report.write_report(results, run.join("report"), args.radii))
    print(f"report: {run.uri}/report")
    return 0


def train_denoiser_main(args: argparse.Namespace) -> int:
    """Runs `pipeline train-denoiser`: a YAML config, overrides, then training (Ray Train with workers >= 1)."""
    _logging(args.verbose)
    from pipeline.config import DenoiserConfig, read_yaml

    try:
        data = read_yaml(args.config, args.set)
        if args.output:
            data["output"] = args.output
        config = DenoiserConfig.from_dict(data)
    except ValueError as error:
        print(f"pipeline: invalid denoiser configuration: {error}", file=sys.stderr)
        return 2
    from pipeline.distributed.train import train_denoiser

    uri = train_denoiser(config)
    print(f"denoiser: {uri}\ncertify with it: --set model.denoiser={uri}")
    return 0


def add_train_denoiser_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="YAML denoiser training configuration")
    parser.add_argument("--output", metavar="URI", help="directory or s3://bucket/prefix for runs and artifacts")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. objective=decrop or workers=2 (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")


def sweep_main(args: argparse.Namespace) -> int:
    """Runs `pipeline sweep`: validates the sweep, then runs or resumes it on Ray Tune."""
    _logging(args.verbose)
    from pipeline.config import ConfigError, load_sweep
    from pipeline.distributed.tune import run_sweep
    from pipeline.sweeps import SweepFailed, SweepRefused

    try:
        sweep = load_sweep(args.config, args.set)
    except ConfigError as error:
        print(f"pipeline: invalid sweep: {error}", file=sys.stderr)
        return 2
    try:
        uri = run_sweep(sweep)
    except (SweepRefused, StorageError) as error:
        print(f"pipeline: {error}", file=sys.stderr)
        return 2
    except SweepFailed as error:
        print(f"pipeline: {error}", file=sys.stderr)
        return 1
    print(f"sweep: {uri}\ntrials: {uri}/trials.parquet  best: {uri}/best_train.yaml, {uri}/best_certify.yaml")
    return 0


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="YAML sweep definition")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a sweep value, e.g. num_samples=8 (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline", description="Certify the adversarial robustness of image classifiers.",
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    certify = commands.add_parser(
        "certify", help="certify a dataset with the configured certifiers",
        description="Certify every image of the configured dataset with every configured certifier on Ray "
                    "(the cluster in RAY_ADDRESS, or a local instance). Writes OUTPUT/RUN_ID/results/*.parquet, "
                    "manifest.json and report/; re-running a run id certifies only the images it lacks.")
    add_certify_arguments(certify)
    certify.set_defaults(handler=certify_main)
    report = commands.add_parser("report", help="write the report of a run from its results",
                                 description="Read RUN/results/*.parquet and write RUN/report/: summary.md, "
                                             "certified_accuracy.csv and curves_<norm>.png.")
    report.add_argument("run", metavar="RUN_URI", help="the run's directory or s3:// URI")
    report.add_argument("--radii", type=float, nargs="+", metavar="R", help="radii for the tables")
    report.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint (default: the AWS chain)")
    report.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")
    report.set_defaults(handler=report_main)
    train = commands.add_parser(
        "train-denoiser", help="train a denoiser for a frozen classifier (Salman et al. objectives, DE-CROP)",
        description="Train a DnCNN denoiser in front of a frozen classifier on a few-sample subset, in this process "
                    "or on Ray Train (workers >= 1). Prints the URI of the best artifact, which `model.denoiser` "
                    "of a certification config accepts.")
    add_train_denoiser_arguments(train)
    train.set_defaults(handler=train_denoiser_main)
    sweep = commands.add_parser(
        "sweep", help="sweep sigma and training hyperparameters with Ray Tune (ASHA)",
        description="Run or resume a Ray Tune sweep over denoiser training settings. Writes trials.parquet, "
                    "objective.png, best_train.yaml and best_certify.yaml under STORAGE/NAME/.")
    add_sweep_arguments(sweep)
    sweep.set_defaults(handler=sweep_main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
