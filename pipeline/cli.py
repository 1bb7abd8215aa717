"""The command line.

Examples:
  pipeline certify --config jobs/configs/demo.yaml
  pipeline certify --config jobs/configs/imagenet.yaml --output s3://bucket/runs --set model.weights=/ckpt/rn50.pt
  pipeline report runs/demo
  pipeline report runs/imagenet --compare ../shared/data/reference/cohen/imagenet_resnet50_sigma0.50.tsv
  pipeline compare runs/demo runs/demo-bf16
  pipeline train-denoiser --config jobs/configs/denoiser_demo.yaml --set objective=decrop
  pipeline train-classifier --config jobs/configs/train_cifar10.yaml --set dataset.root=/data/cifar10
  pipeline sweep --config jobs/configs/sweep_demo.yaml
  pipeline nightly --config jobs/configs/nightly_demo.yaml --date 2026-11-20
  pipeline config-schema > run_config.schema.json
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys

from pipeline.families import FAMILIES

log = logging.getLogger("pipeline")


def setup_logging(verbose: bool, *names: str) -> None:
    """The project's INFO lines (DEBUG with -v) and everyone's warnings; Ray's own output only with -v
    (`pipeline.distributed.set_verbose`, applied when Ray is first used). `names`: more loggers at the
    project's level (a job's own)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in ("pipeline", *names):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


def _ray_verbosity(verbose: bool) -> None:
    from pipeline.distributed import set_verbose

    set_verbose(verbose)


def add_certify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="YAML run configuration")
    parser.add_argument("--output", metavar="URI", help="directory or s3://bucket/prefix for runs (overrides `output`)")
    parser.add_argument("--run-id", metavar="ID", help="name of this run (overrides `run_id`); re-running an id "
                                                       "resumes it")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, dotted keys and YAML values, e.g. certifiers.0.sigma=0.5 "
                             "(repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log debugging detail, with Ray's progress output and INFO logs")


CERTIFY_EXIT_CODES = """Exit codes:
  0    finished: every listed image has a row for every setting
  1    the run stopped: rows missing at the end (incomplete), the run id busy, object storage unreachable,
       or a write that failed (a full disk, a deleted bucket); the manifest says why; rerun to go on
  2    the configuration, the storage, the dataset or the run folder (a damaged manifest.json, a file in
       results/ this run did not write) refused before any work
  130  interrupted by Ctrl-C; 143: stopped by SIGTERM (`ray job stop`); the manifest says interrupted"""


CLASSIFIERS = "Classifiers (model.name), by family:\n" + "\n".join(f"  - {family}" for family in FAMILIES)
CERTIFY_EPILOG = f"{CLASSIFIERS}\n\n{CERTIFY_EXIT_CODES}"


def certify_main(args: argparse.Namespace) -> int:
    """Runs `pipeline certify`. Exit codes (CERTIFY_EXIT_CODES): 0 finished; 1 the run stopped (incomplete,
    busy, storage outage, a failed write); 2 configuration, storage, dataset or run-folder problems, before any
    work; 130 Ctrl-C; 143 SIGTERM."""
    setup_logging(args.verbose)
    log.info("certifying as %s says (loading the libraries, the model and the dataset listing)", args.config)
    from pipeline.config import ConfigError, load_config
    from pipeline.data.sources import DatasetError
    from pipeline.lease import RunBusy
    from pipeline.run import IncompleteRun
    from pipeline.storage import StorageError, StorageOutage, WriteFailed

    try:
        config = load_config(args.config, args.set, output=args.output, run_id=args.run_id)
        _ray_verbosity(args.verbose)
        from pipeline.distributed.certify import run

        summary = run(config)
    except KeyboardInterrupt as stop:  # Ctrl-C: 130; SIGTERM (`ray job stop`): 143 (pipeline.run.Interrupted)
        print(f"pipeline: {stop if str(stop) not in ('', 'SIGTERM') else 'interrupted'}", file=sys.stderr)
        return getattr(stop, "exit_code", 130)
    except (IncompleteRun, RunBusy, StorageOutage, WriteFailed) as error:
        print(f"pipeline: {error}", file=sys.stderr)
        return 1
    except (ConfigError, StorageError, DatasetError, ValueError) as error:
        if args.verbose:
            raise
        print(f"pipeline: {'invalid configuration: ' if isinstance(error, ConfigError) else ''}{error}",
              file=sys.stderr)
        return 2
    print(summary.brief)
    print(f"report: {summary.location.join('report', 'index.html').uri} (also summary.md, certified_accuracy.csv, "
          f"PNGs)")
    print(f"results: {summary.location.join('results').uri}")
    return 0


def report_main(args: argparse.Namespace) -> int:
    """Runs `pipeline report`: rewrites a run's report from its results, beside any `--compare` sources. A
    results file that is not result rows, a missing run or an unreadable source exits 2 with one line naming
    it; the brief says when the run is not finished (its manifest's status)."""
    setup_logging(args.verbose)
    from pipeline import report
    from pipeline.compare import load_source
    from pipeline.results import read_results
    from pipeline.storage import Storage

    storage = Storage(endpoint_url=args.endpoint_url)
    try:
        run = storage.open(args.run)
        results = read_results(run.join("results"))
        compared = [load_source(spec, storage) for spec in args.compare]
        manifest = read_manifest(run)
    except (ValueError, OSError) as error:
        print(f"pipeline: {error}", file=sys.stderr)
        return 2
    if results.num_rows == 0:
        print(f"pipeline: no results under {run.uri}/results", file=sys.stderr)
        return 2
    label = (manifest or {}).get("run_id") or run.uri.rstrip("/").rsplit("/", 1)[-1]
    report.write_report(results, run.join("report"), args.radii, manifest, compared, label)
    status = (manifest or {}).get("status")
    if status not in (None, "finished"):
        reason = f": {manifest['reason']}" if manifest.get("reason") else ""
        print(f"NOT FINISHED: run {label} is {status}{reason}; the figures cover the {results.num_rows} rows "
              f"written so far")
    print(report.brief(results, args.radii, compared, label))
    print(f"report: {run.join('report', 'index.html').uri}")
    return 0


def read_manifest(run) -> dict | None:
    """A run's manifest.json (None where there is none); ValueError naming the file when it is not JSON."""
    import json

    if not run.join("manifest.json").exists():
        return None
    try:
        return run.read_json("manifest.json")
    except json.JSONDecodeError as error:
        raise ValueError(f"{run.join('manifest.json').uri} is not valid JSON ({error})") from error


def compare_main(args: argparse.Namespace) -> int:
    """Runs `pipeline compare A B`: per-setting differences of certified accuracy with their uncertainty."""
    setup_logging(args.verbose)
    from pipeline.compare import differences, format_differences, load_source
    from pipeline.storage import Storage

    storage = Storage(endpoint_url=args.endpoint_url)
    try:
        a, b = load_source(args.a, storage), load_source(args.b, storage)
    except (ValueError, OSError) as error:
        print(f"pipeline: {error}", file=sys.stderr)
        return 2
    print(format_differences(differences(a, b, args.radii, args.confidence), a, b, args.confidence))
    return 0


def train(config) -> str:
    """Trains what `config` describes (a `DenoiserConfig` or a `ClassifierTraining`): in this process when its
    `workers` is 0, without importing Ray, else on Ray Train (`pipeline.distributed.train`); returns the
    URI of the artifact (the best denoiser, or the classifier's checkpoint)."""
    from pipeline.config import DenoiserConfig

    denoiser = isinstance(config, DenoiserConfig)
    if config.workers == 0:
        if denoiser:
            from pipeline.denoise.train import fit_local
        else:
            from pipeline.train_classifier import fit_local
        return fit_local(config)
    from pipeline.distributed import train as on_ray

    return on_ray.train_denoiser(config) if denoiser else on_ray.train_classifier(config)


def _train_main(args: argparse.Namespace, kind: type, artifact: str, what: str, flag: str) -> int:
    """A training sub-command: a YAML config of `kind` (`what` in messages), `--set` overrides and
    `--output`, then `train`; an invalid config exits with status 2 before any work. Prints the URI of the
    `artifact` and the `--set` (of `flag`) that certifies with it."""
    setup_logging(args.verbose)
    from pipeline.config import read_yaml

    try:
        data = read_yaml(args.config, args.set)
        if args.output:
            data["output"] = args.output
        config = kind.from_dict(data)
    except ValueError as error:
        print(f"pipeline: invalid {what} configuration: {error}", file=sys.stderr)
        return 2
    if config.workers:
        _ray_verbosity(args.verbose)
    uri = train(config)
    print(f"{artifact}: {uri}\ncertify with it: --set {flag}={uri}")
    return 0


def train_denoiser_main(args: argparse.Namespace) -> int:
    """Runs `pipeline train-denoiser`: a YAML config, overrides, then training (Ray Train with workers >= 1)."""
    from pipeline.config import DenoiserConfig

    return _train_main(args, DenoiserConfig, "denoiser", "denoiser", "model.denoiser")


def train_classifier_main(args: argparse.Namespace) -> int:
    """Runs `pipeline train-classifier`: a YAML config, overrides, then training (Ray Train with workers >= 1)."""
    from pipeline.train_classifier import ClassifierTraining

    return _train_main(args, ClassifierTraining, "classifier", "classifier training", "model.weights")


def _add_training_arguments(parser: argparse.ArgumentParser, what: str, output: str, example: str) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help=f"YAML {what} training configuration")
    parser.add_argument("--output", metavar="URI", help=f"directory or s3://bucket/prefix for {output}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value, e.g. {example} (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log debugging detail, with Ray's progress output and INFO logs")


def add_train_denoiser_arguments(parser: argparse.ArgumentParser) -> None:
    _add_training_arguments(parser, "denoiser", "runs and artifacts", "objective=decrop or workers=2")


def add_train_classifier_arguments(parser: argparse.ArgumentParser) -> None:
    _add_training_arguments(parser, "classifier", "the checkpoint", "arch=cifar_resnet20 or epochs=1")


def sweep_main(args: argparse.Namespace) -> int:
    """Runs `pipeline sweep`: validates the sweep, then runs or resumes it on Ray Tune."""
    setup_logging(args.verbose)
    from pipeline.config import ConfigError
    from pipeline.distributed.tune import run_sweep
    from pipeline.storage import StorageError
    from pipeline.sweeps import SweepFailed, SweepInterrupted, SweepRefused, load_sweep

    try:
        sweep = load_sweep(args.config, args.set)
    except ConfigError as error:
        print(f"pipeline: invalid sweep: {error}", file=sys.stderr)
        return 2
    _ray_verbosity(args.verbose)
    try:
        uri = run_sweep(sweep)
    except (SweepRefused, StorageError) as error:
        print(f"pipeline: {error}", file=sys.stderr)
        return 2
    except SweepFailed as error:
        print(f"pipeline: {error}", file=sys.stderr)
        return 1
    except SweepInterrupted as error:
        print(f"pipeline: {error}", file=sys.stderr)
        return error.exit_code
    print(f"sweep: {uri}\ntrials: {uri}/trials.parquet  best: {uri}/best_train.yaml, {uri}/best_certify.yaml")
    return 0


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="YAML sweep definition")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a sweep value, e.g. num_samples=8 (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log debugging detail, with Ray's progress output and INFO logs")


SWEEP_EXIT_CODES = """Exit codes:
  0    every planned trial ended (finished or errored); best_train.yaml and best_certify.yaml name the best
       finished trial
  1    no finished trial reported the objective (no best configs written)
  2    an invalid sweep config or search space, or a sweep folder that cannot be resumed as this sweep
  130  interrupted by Ctrl-C (143: by SIGTERM) before every trial ended: no best configs; the printed line
       says how many trials are finished; rerunning the same command resumes"""


NIGHTLY_EXIT_CODES = """Exit codes:
  0  no regression, every figure compared (or no earlier night to compare with)
  1  a regression: the printed REGRESSION lines and report.md say which figures moved (also when other
     figures were not compared); an uncaught error (a bug) also exits 1, with a traceback and no REGRESSION
  2  an invalid suite (one line naming the key) or bad command-line arguments; nothing is run
  3  could not compare: the earlier night's figures.parquet is unreadable (named in the printed line and
     in report.md); tonight's figures are still written
  4  not compared: the suite changed since the earlier night (a model's label, section or weights, a
     certifier parameter, the dataset); the NOT COMPARED lines and report.md name what is on one night
     only or what changed, and the figures that still match were compared without a regression
  5  a model's run failed or could not start (one line naming it); no figures are written"""


def nightly_main(args: argparse.Namespace) -> int:
    """Runs `pipeline nightly`: the suite's night (`pipeline.nightly.suite.night`); returns its exit code. An
    invalid suite exits 2 and a failed run 5, each with one line, before any figure is written."""
    setup_logging(args.verbose, "nightly")
    from pipeline.config import ConfigError, NightlySuite, read_yaml

    try:
        suite = NightlySuite.from_dict(read_yaml(args.config, args.set))
    except ConfigError as error:
        print(f"pipeline: invalid nightly suite: {error}", file=sys.stderr)
        return 2
    _ray_verbosity(args.verbose)
    from pipeline.data.sources import DatasetError
    from pipeline.lease import RunBusy
    from pipeline.nightly.suite import EXIT_INVALID, EXIT_RUN_FAILED, night
    from pipeline.run import IncompleteRun
    from pipeline.storage import StorageError

    try:
        return night(suite, args.date)
    except (IncompleteRun, RunBusy, StorageError) as error:
        print(f"pipeline: nightly {args.date}: a run failed: {error}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except (ConfigError, DatasetError, ValueError) as error:
        if args.verbose:
            raise
        hint = "; this date's night ran another suite: give another --date" if "already exists" in str(error) else ""
        print(f"pipeline: nightly {args.date}: {error}{hint}", file=sys.stderr)
        return EXIT_INVALID


def night_date(text: str) -> str:
    """A --date value: a calendar date written YYYY-MM-DD (it names the night's folder)."""
    try:
        written = datetime.date.fromisoformat(text).isoformat()
    except ValueError:
        written = None
    if written != text:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}")
    return text


def add_nightly_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="YAML benchmark suite")
    parser.add_argument("--date", type=night_date, default=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
                        help="the night's date, YYYY-MM-DD (default: today, UTC)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a suite value, e.g. models.0.model.weights=PATH (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log debugging detail, with Ray's progress output and INFO logs")


def _add_nightly_command(commands) -> None:
    nightly = commands.add_parser(
        "nightly", help="run the nightly benchmark suite and compare with the last night",
        description="Run the suite (the same dataset subset, certifiers and seeds for every model), write "
                    "OUTPUT/nightly/DATE/ (figures.parquet, environment.json, report.md, accuracy.png and each "
                    "model's run), compare with the most recent earlier night and print the figures that moved. "
                    "Rerunning a date reuses its runs.", epilog=NIGHTLY_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_nightly_arguments(nightly)
    nightly.set_defaults(handler=nightly_main)


def config_schema_main(args: argparse.Namespace) -> int:
    """Runs `pipeline config-schema`: prints the JSON schema of a run config (or of another config kind)."""
    import json

    from pipeline.config import DenoiserConfig, NightlySuite, schema
    from pipeline.sweeps import SweepConfig

    if args.kind == "run":
        found = schema()
    elif args.kind == "classifier":
        from pipeline.train_classifier import ClassifierTraining

        found = ClassifierTraining.model_json_schema()
    else:
        kinds = {"denoiser": DenoiserConfig, "sweep": SweepConfig, "nightly": NightlySuite}
        found = kinds[args.kind].model_json_schema()
    print(json.dumps(found, indent=2))
    return 0


def _add_config_schema_command(commands) -> None:
    config_schema = commands.add_parser(
        "config-schema", help="print the JSON schema of a run config (every key, its type, default and rules)",
        description="Print the JSON schema (pydantic's) of a certification run config, or with --kind of a "
                    "denoiser training, a sweep, a nightly suite or a classifier training.")
    config_schema.add_argument("--kind", choices=["run", "denoiser", "sweep", "nightly", "classifier"],
                               default="run", help="which config (default: run)")
    config_schema.set_defaults(handler=config_schema_main)


def _add_training_commands(commands) -> None:
    train = commands.add_parser(
        "train-denoiser", help="train a denoiser for a frozen classifier (Salman et al. objectives, DE-CROP)",
        description="Train a DnCNN denoiser in front of a frozen classifier on a few-sample subset, in this process "
                    "or on Ray Train (workers >= 1). Prints the URI of the best artifact, which `model.denoiser` "
                    "of a certification config accepts.")
    add_train_denoiser_arguments(train)
    train.set_defaults(handler=train_denoiser_main)
    classifier = commands.add_parser(
        "train-classifier", help="train a base classifier with noise augmentation (Gaussian, SSN or DSSN noise)",
        description="Train a base classifier with Gaussian or splitting noise, in this process or on Ray Train "
                    "(workers >= 1). Writes OUTPUT/checkpoint.pth.tar in the published layout after every epoch "
                    "(and training.json), which `model.weights` of a certification config accepts.")
    add_train_classifier_arguments(classifier)
    classifier.set_defaults(handler=train_classifier_main)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline", description="Certify the adversarial robustness of image classifiers.",
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    certify = commands.add_parser(
        "certify", help="certify a dataset with the configured certifiers",
        description="Certify every image of the configured dataset with every configured certifier on Ray "
                    "(the cluster in RAY_ADDRESS, or a local instance). Writes OUTPUT/RUN_ID/results/*.parquet, "
                    "manifest.json and report/; re-running a run id certifies only the images it lacks (and "
                    "retries those with error rows).", epilog=CERTIFY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_certify_arguments(certify)
    certify.set_defaults(handler=certify_main)
    report = commands.add_parser(
        "report", help="write the report of a run from its results, optionally beside other runs or logs",
        description="Read RUN/results/*.parquet and write RUN/report/: index.html (self-contained), summary.md, "
                    "certified_accuracy.csv, curves_<norm>.png and eps_out.png. --compare puts other runs or the "
                    "authors' certify.py logs (idx label predict radius correct time) on the same axes and tables. "
                    "The brief says NOT FINISHED for a run whose manifest is not finished. Exit 2 with one line "
                    "for a source that cannot be read (a results file that is not result rows is named).")
    report.add_argument("run", metavar="RUN_URI", help="the run's directory or s3:// URI")
    report.add_argument("--compare", nargs="+", default=[], metavar="SOURCE",
                        help="other runs (directory or s3:// URI) or log files; a log takes its sigma from "
                             "'sigma0.50' in its name or from options: LOG,sigma=0.5[,n=100000,n0=100,alpha=0.001]"
                             "[,label=NAME]")
    report.add_argument("--radii", type=float, nargs="+", metavar="R", help="radii for the tables")
    report.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint (default: the AWS chain)")
    report.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")
    report.set_defaults(handler=report_main)
    compare = commands.add_parser(
        "compare", help="per-setting differences of certified accuracy between two runs (or a run and a log)",
        description="Print B - A per setting and radius, with confidence intervals (Newcombe's hybrid score "
                    "interval; Welch's t for ACR) and Fisher exact p-values, treating the two as independent "
                    "samples of images. Settings pair by full setting, else by certifier, norm, mode and sigma; "
                    "those without a partner are listed, and a warning says when the two hold different images. "
                    "Exit 2 with one line for a source that cannot be read (a results file that is not result "
                    "rows is named).")
    compare.add_argument("a", metavar="A", help="a run (directory or s3:// URI) or a log file (LOG,sigma=S)")
    compare.add_argument("b", metavar="B", help="the same for the other side")
    compare.add_argument("--radii", type=float, nargs="+", metavar="R", help="radii to compare at")
    compare.add_argument("--confidence", type=float, default=0.95, help="interval confidence (default 0.95)")
    compare.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint (default: the AWS chain)")
    compare.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")
    compare.set_defaults(handler=compare_main)
    _add_training_commands(commands)
    sweep = commands.add_parser(
        "sweep", help="sweep sigma and training hyperparameters with Ray Tune (ASHA)",
        description="Run or resume a Ray Tune sweep over denoiser training settings. Writes trials.parquet, "
                    "objective.png, best_train.yaml and best_certify.yaml under STORAGE/NAME/.",
        epilog=SWEEP_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_arguments(sweep)
    sweep.set_defaults(handler=sweep_main)
    _add_nightly_command(commands)
    _add_config_schema_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
