"""The command line: `pipeline certify --config FILE`.

Examples:
  pipeline certify --config jobs/configs/demo.yaml
  pipeline certify --config jobs/configs/demo.yaml --output /tmp/runs --set certifiers.0.n=10000
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

import pipeline
from pipeline import report
from pipeline.config import ConfigError, RunConfig, load_config
from pipeline.data import load_dataset
from pipeline.models import load_model

log = logging.getLogger("pipeline")


def run_certify(config: RunConfig) -> Path:
    """Certifies the configured dataset in this process; writes results and a summary under output/run_id."""
    certifiers = config.build_certifiers()
    images, labels, ids = load_dataset(config.dataset)
    model = load_model(config.model)
    log.info("run %s: %d images, certifiers %s", config.run_id, len(images), [c.name for c in certifiers])
    started = time.perf_counter()
    table = pipeline.certify(model, images, labels, certifiers, seed=config.seed, batch_size=config.batch_size,
                             device=config.device, precision=config.precision, image_ids=ids, progress=True)
    elapsed = time.perf_counter() - started
    run_dir = Path(config.output) / config.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, run_dir / "results.parquet")
    text = report.summary(table)
    (run_dir / "summary.md").write_text(text + "\n")
    print(text)
    log.info("certified %d images in %.1f s (%.2f images/s); results in %s", len(images), elapsed,
             len(images) / elapsed, run_dir / "results.parquet")
    return run_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline", description="Certify the adversarial robustness of image classifiers.",
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    certify = commands.add_parser(
        "certify", help="certify a dataset with the configured certifiers",
        description="Certify every image of the configured dataset with every configured certifier, "
                    "and write one result row per (image, certifier) as Parquet under OUTPUT/RUN_ID/.")
    add_certify_arguments(certify)
    return parser


def add_certify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="YAML run configuration")
    parser.add_argument("--output", metavar="DIR", help="where runs are written (overrides `output`)")
    parser.add_argument("--run-id", metavar="ID", help="name of this run's folder (overrides `run_id`)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, dotted keys and YAML values, e.g. certifiers.0.sigma=0.5 "
                             "(repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")


def certify_main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.set, output=args.output, run_id=args.run_id)
    except ConfigError as error:
        print(f"pipeline: invalid configuration: {error}", file=sys.stderr)
        return 2
    run_certify(config)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return certify_main(args)


if __name__ == "__main__":
    sys.exit(main())
