"""The result schema: one row per (image, certifier, setting), defined once as a pyarrow schema.

Every column carries its description in the schema's field metadata (`describe()` lists them), so a
Parquet file of results documents itself. Each row also records what its certifier declares (`norm`,
`kind`, `max_radius`, `targets`, `noise`, `covers`), so readers need nothing but the rows. Files are read
against this schema: a column that an older file lacks reads as null.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.certifiers import Certificate, Cohen
from pipeline.certifiers.base import Cost
from pipeline.data.sources import DatasetSpec
from pipeline.models import ModelSpec
from pipeline.storage import Location, StorageOutage

_COLUMNS: list[tuple[str, pa.DataType, bool, str]] = [
    ("image_index", pa.int64(), False,
     "Position of the image in its dataset (in a run: the dataset index, as the papers' `idx`; in "
     "`pipeline.certify`: the position in the batch given)."),
    ("image_id", pa.string(), False,
     "Stable identity of the image: the caller's id, or 'sha256:' and a hash of its pixels. It seeds the noise."),
    ("label", pa.int64(), True, "True class of the image; null when labels were not given."),
    ("certifier", pa.string(), False, "Certifier name, as in config: 'cohen', 'topk', ..."),
    ("setting", pa.string(), False,
     "The certifier with all its settings, e.g. 'cohen(sigma=0.25, alpha=0.001, n0=100, n=100000, mode=certify)'; "
     "a run holds one row per (image_id, setting)."),
    ("sigma", pa.float64(), False, "Noise scale in [0, 1] pixel units."),
    ("prediction", pa.int64(), True,
     "Class the certificate is about (cohen, dssn, ssn: the smoothed prediction; topk: the label certified to "
     "stay in the top k); -1 when the certifier abstained; null for center smoothing, which certifies outputs."),
    ("abstained", pa.bool_(), False, "True when no certificate was issued (prediction -1, radius 0)."),
    ("radius", pa.float64(), False,
     "Certified input radius in the row's norm, in [0, 1] pixel units (center: eps_in); 0.0 on abstention."),
    ("norm", pa.string(), False,
     "Norm of the certified ball, as the certifier declares it: 'l2' (cohen, topk, center, smooth_reduce) or "
     "'l1' (dssn, ssn)."),
    ("kind", pa.string(), True,
     "What the certifier is (`pipeline.certifiers.base`): 'counting' (a class, from counts of draws), "
     "'sampling' (a class, sampling on its own: sequential modes, smooth_reduce) or 'output' (outputs, not a "
     "class: center). Null in rows written before it was recorded."),
    ("max_radius", pa.float64(), True,
     "The largest radius the setting can certify (its certificate when every draw votes for one class); null "
     "where there is no fixed maximum (sequential modes, PREDICT, output certifiers, published logs) or in rows "
     "written before it was recorded."),
    ("targets", pa.list_(pa.float64()), True,
     "The only radii the setting decides (mode=sequential's target radii); empty: every radius. Null in rows "
     "written before it was recorded."),
    ("noise", pa.string(), True,
     "The noise the certificate was sampled with (`pipeline.noise.NOISE_KINDS`): 'sound_gaussian' (integer "
     "noise on the 1/255 grid, exact in floating point), 'gaussian' (real-valued, added in float), 'ssn', "
     "'dssn'. Null in rows written before it was recorded (those used 'gaussian' for the l2 certifiers)."),
    ("covers", pa.string(), True,
     "What the radius covers: 'grid 1/255' (every perturbed input on the 1/255 grid within the radius: sound "
     "noise, dssn) or 'real' (every real perturbed input within the radius, as the theorem for real-valued "
     "noise states; floating-point sampling does not guarantee it). Null in rows written before it was "
     "recorded."),
    ("p_lower", pa.float64(), True,
     "Lower confidence bound on the probability under noise of the class examined (cohen, ssn: the selected "
     "top class; topk: the label), also when it abstains; dssn: the exact vote share c_A / L."),
    ("count", pa.int64(), True, "Estimation draws that voted for the class examined."),
    ("n", pa.int64(), False, "Estimation draws (center: the m certification draws)."),
    ("n0", pa.int64(), False,
     "Selection draws (0 when the certifier needed none; center: the draws of the centre search and check)."),
    ("alpha", pa.float64(), False,
     "Probability that this certificate is wrong (0 for the deterministic DSSN; center: alpha1 + alpha2 + "
     "(1/2 - delta)^k for k candidate centres)."),
    ("correct", pa.bool_(), True,
     "Certified and about the true label (prediction == label); null without labels and for center rows."),
    ("topk_labels", pa.list_(pa.int64()), True,
     "cohen: [prediction] unless it abstained; topk: top-k PREDICT on the estimation draws (null on abstention)."),
    ("forward_passes", pa.int64(), False,
     "Model evaluations this certificate rests on (n0 + n; smooth_reduce: times the patches); passes shared "
     "between certifiers count for each (params.shared_passes: those an earlier row of the image paid for)."),
    ("seed", pa.int64(), False, "Run seed; with image_id it determines every noise draw."),
    ("wall_time_s", pa.float64(), False,
     "Seconds attributed to this row: sampling time in proportion to the forward passes it paid for, plus "
     "its own math."),
    ("status", pa.string(), False, "'ok', or 'error' when the image could not be certified."),
    ("error", pa.string(), True, "What went wrong, for rows with status 'error'."),
    ("precision", pa.string(), False,
     "Precision the model ran at ('fp32' or 'bf16'); the certificate holds for the model at that precision."),
    ("device", pa.string(), False, "Device the model ran on ('cpu', 'cuda', ...)."),
    ("params", pa.string(), False,
     "JSON of the certifier's full settings plus the noise scheme, precision and batch size, and per-image "
     "details (dssn: the template's identity; smooth_reduce: the patch plan and radius factors)."),
    ("eps_in", pa.float64(), True, "Output certifiers (center): the input radius the output bound is for."),
    ("eps_out", pa.float64(), True,
     "Output certifiers (center): certified bound on the distance between the smoothed outputs at x and at "
     "any x' within eps_in."),
    ("smoothing_error", pa.float64(), True,
     "Output certifiers (center): distance between the smoothed output and the clean output f(x)."),
    ("metric", pa.string(), True,
     "Output certifiers: the output distance (center: l2, angular, total_variation, tv1, tv2, jaccard)."),
    ("output", pa.string(), True,
     "Output certifiers: what was smoothed (center: logits, probs, features, denoised)."),
    ("abstain_reason", pa.string(), True, "Why the certifier abstained, where it says (center: the check failed)."),
    ("run_id", pa.string(), True, "The run that wrote the row (null outside a run)."),
    ("model", pa.string(), True, "The classifier certified, as named in the run's config (its weights where the config "
                                   "names none)."),
    ("classifier", pa.string(), True,
     "JSON of the classifier that ran: family (project, torchvision, timm, huggingface), name, weights (as the "
     "config gave them) and weights_sha256 (the file's SHA-256, as sha256sum prints it), num_classes, the mean "
     "and std in front of it, input_size (C, H, W) and resized_from (the dataset's, where it was resized)."),
    ("denoiser", pa.string(), True,
     "JSON of the denoiser in front of the classifier (null without one): its weights as given and their "
     "SHA-256, its architecture and, for a diffusion denoiser, the timestep t_star it denoises this row's "
     "sigma at and alpha_bar at t_star."),
    ("node", pa.string(), True,
     "Where the image was certified: the host name and the first 12 hex digits of the Ray node id, as 'host/id' "
     "(two Ray nodes on one host differ)."),
    ("code_version", pa.string(), True, "Version of this package (and git commit, where known) that wrote the row."),
]

# Columns that only some certifiers (the output certifiers) or only runs fill; null elsewhere.
CERTIFIER_EXTRAS = ("eps_in", "eps_out", "smoothing_error", "metric", "output", "abstain_reason")
RUN_COLUMNS = ("run_id", "model", "classifier", "node", "code_version")

SCHEMA = pa.schema(
    [pa.field(name, dtype, nullable=nullable, metadata={"description": text})
     for name, dtype, nullable, text in _COLUMNS]
)

__all__ = ["KEY_COLUMNS", "REQUIRED", "SCHEMA", "ForeignResults", "ResultsUnreadable", "RowContext",
           "check_result_file", "code_version", "describe", "environment", "manifest_matches", "read_certify_log",
           "read_results", "read_run_keys", "result_row", "to_table"]


def describe() -> dict[str, str]:
    """Column name -> description."""
    return {name: text for name, _, _, text in _COLUMNS}


def to_table(rows: list[dict]) -> pa.Table:
    """Result rows (dicts with exactly the schema's columns) as a table in the schema's column order."""
    for row in rows:
        if set(row) != set(SCHEMA.names):
            missing, extra = set(SCHEMA.names) - set(row), set(row) - set(SCHEMA.names)
            raise ValueError(f"result row does not match the schema: missing {sorted(missing)}, extra {sorted(extra)}")
    return pa.Table.from_pylist(rows, schema=SCHEMA)


@dataclass(frozen=True)
class RowContext:
    """What the rows of one certification call share: the seed, where and how the model ran (`settings`:
    the noise scheme and engine settings, recorded in params), the run's columns, the input shape and the
    model's number of classes (None where not known)."""

    seed: int
    precision: str = "fp32"
    device: str = "cpu"
    settings: dict = field(default_factory=dict)
    run: dict = field(default_factory=dict)
    input_shape: tuple | None = None
    num_classes: int | None = None


def result_row(certifier, certificate, image_index: int, image_id: str, label: int | None, seconds: float,
               context: RowContext) -> dict:
    """The row of SCHEMA for one (image, certifier): the certificate with its cost, or, for a certificate
    that `failed`, status 'error' with the reason, and what the certifier declares about itself (norm, kind,
    largest certifiable radius, target radii). Every row is built here."""
    classifies, failed, cost = certifier.classifies, certificate.error is not None, certificate.cost
    correct = None
    if classifies and label is not None:
        correct = not certificate.abstained and certificate.prediction == label
    params = {**certifier.params(None if failed else context.input_shape), **context.settings,
              **(certificate.details or {})}
    return {
        "image_index": image_index, "image_id": image_id, "label": label, "certifier": certifier.name,
        "setting": certifier.setting, "sigma": float(certifier.sigma),
        "prediction": certificate.prediction if classifies else None, "abstained": certificate.abstained,
        "radius": certificate.radius, "norm": certifier.norm, "kind": certifier.kind,
        "max_radius": certifier.max_radius(context.num_classes, certificate.details),
        "targets": list(certifier.targets), "noise": certifier.noise_kind, "covers": certifier.covers,
        "p_lower": certificate.p_lower,
        "count": certificate.count, "n": cost.n, "n0": cost.n0, "alpha": float(certifier.failure_probability),
        "correct": correct, "topk_labels": certificate.topk_labels, "forward_passes": cost.forward_passes,
        "wall_time_s": seconds, "status": "error" if failed else "ok", "error": certificate.error,
        "params": json.dumps(params, sort_keys=True),
        **dict.fromkeys(CERTIFIER_EXTRAS), **(certificate.extra or {}),
        "seed": context.seed, "precision": context.precision, "device": context.device,
        **{key: context.run.get(key) for key in RUN_COLUMNS},
        "denoiser": _denoiser_of(context.run.get("denoiser"), certifier.sigma),
    }


def _denoiser_of(records: dict | None, sigma: float) -> str | None:
    """The denoiser's record for rows of noise level `sigma`, as JSON (a run keys them by repr(sigma))."""
    record = (records or {}).get(repr(float(sigma)))
    return json.dumps(record, sort_keys=True) if record is not None else None


class ResultsUnreadable(ValueError):
    """A file under a run's `results/` that cannot be read as result rows: unreadable (a truncated or foreign
    file), lacking a column every row has, or holding a column of another type. The message names the file."""


REQUIRED = tuple(field.name for field in SCHEMA if not field.nullable)  # columns every result row has


def read_results(location: Location, columns: list[str] | None = None) -> pa.Table:
    """Every result row under a run's `results/` directory (an empty table when there is none). ResultsUnreadable
    names the first file that is not result rows (see `check_result_file`); a file written before a nullable
    column existed reads that column as null."""
    files = location.list_files(".parquet")
    if not files:
        return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(columns)
    try:
        table = location.retrying(lambda: pads.dataset(files, filesystem=location.fs, format="parquet",
                                                       schema=SCHEMA).to_table(columns=columns),
                                  "reading the results in")
    except StorageOutage:
        raise
    except (pa.ArrowException, OSError) as error:
        _name_the_file(location, files)
        raise ResultsUnreadable(f"cannot read the results in {location.uri}: {_first_line(error)}") from error
    if any(table[name].null_count for name in REQUIRED if name in table.column_names):
        _name_the_file(location, files)
    return table


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _name_the_file(location: Location, files: list[str]) -> None:
    """Raises ResultsUnreadable for the first of `files` that is not result rows (only called once reading
    them all failed, so it may read each)."""
    for path in files:
        problem = check_result_file(location.fs, path)
        if problem:
            uri = location.join(path.rsplit("/", 1)[-1]).uri
            raise ResultsUnreadable(f"{uri} is not a file of result rows ({problem}); move it out of "
                                    f"{location.uri} or delete it")


def check_result_file(fs, path: str) -> str | None:
    """Why the Parquet file at `path` on `fs` is not result rows (unreadable, a required column missing or
    null, a column of another type), or None when it reads as result rows."""
    try:
        table = pads.dataset([path], filesystem=fs, format="parquet", schema=SCHEMA).to_table()
        names = set(pads.dataset([path], filesystem=fs, format="parquet").schema.names)
    except (pa.ArrowException, OSError) as error:
        return f"cannot be read as result rows: {_first_line(error)}"
    missing = [name for name in REQUIRED if name not in names]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        return f"it lacks the result column(s) {shown}"
    nulls = [name for name in REQUIRED if table[name].null_count]
    return f"null values in the column(s) {', '.join(nulls)}" if nulls else None


KEY_COLUMNS = ["image_id", "setting", "status", "run_id", "seed"]


class ForeignResults(ValueError):
    """Files in a run's `results/` that this run did not write with this config (unreadable, another schema,
    another run id, seed or settings); the message names them and says what to do."""


def read_run_keys(location: Location, run_id: str, settings: list[str], seed: int) -> pa.Table:
    """The key columns (KEY_COLUMNS, plus `file`: the file's name) of every result file under a run's
    `results/`, each file checked to be this run's: Parquet of this schema, with rows of `run_id` and `seed`
    and of the configured `settings` only. ForeignResults naming the files that are not (nothing is read
    past a refusal, and nothing is changed)."""
    files = location.list_files(".parquet")
    if not files:
        return pa.table({**{name: pa.array([], SCHEMA.field(name).type) for name in KEY_COLUMNS},
                         "file": pa.array([], pa.string())})
    with ThreadPoolExecutor(max_workers=16 if location.is_s3 else 1) as pool:
        read = list(pool.map(lambda path: _file_keys(location, path, run_id, set(settings), seed), files))
    problems = [(path, problem) for path, (_, problem) in zip(files, read, strict=True) if problem]
    if problems:
        path, problem = problems[0]
        others = f" (and {len(problems) - 1} more file(s) like it)" if len(problems) > 1 else ""
        raise ForeignResults(
            f"{location.uri}/{path.rsplit('/', 1)[-1]}{others}: {problem}; it was not written by run {run_id} with "
            f"this config. A changed config needs another run_id; a file that does not belong here must be moved out "
            f"of {location.uri} (its images are then certified again)")
    return pa.concat_tables([table for table, _ in read])


def _file_keys(location: Location, path: str, run_id: str, settings: set[str], seed: int) -> tuple[pa.Table, str]:
    """(the file's key columns, '') or (None, what makes it another run's file)."""
    name = path.rsplit("/", 1)[-1]

    def read() -> tuple[pa.Schema, pa.Table | None]:
        with location.fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            schema = parquet.schema_arrow
            present = set(KEY_COLUMNS) <= set(schema.names)
            return schema, parquet.read(columns=KEY_COLUMNS) if present else None

    try:
        schema, keys = location.retrying(read, f"reading {name} from")
    except StorageOutage:
        raise
    except (OSError, pa.ArrowException) as error:
        return None, f"cannot be read as Parquet ({(str(error).strip().splitlines() or [''])[0][:200]})"
    unknown = sorted(set(schema.names) - set(SCHEMA.names))
    missing = [column for column in KEY_COLUMNS if column not in schema.names]
    if unknown or missing:
        return None, f"is not a result file of this project (columns {unknown} unknown, {missing} missing)"
    wrong = [f"{field.name} is {field.type}, not {SCHEMA.field(field.name).type}" for field in schema
             if not field.type.equals(SCHEMA.field(field.name).type)]
    if wrong:
        return None, f"does not match the result schema ({'; '.join(wrong[:3])})"
    runs = sorted(str(value) for value in set(keys["run_id"].to_pylist()) - {run_id})
    if runs:
        return None, f"holds rows of run(s) {runs[:3]}"
    seeds = sorted(set(keys["seed"].to_pylist()) - {seed})
    if seeds:
        return None, f"holds rows of seed {seeds[:3]} (this config's seed is {seed})"
    foreign = sorted(set(keys["setting"].to_pylist()) - settings)
    if foreign:
        return None, f"holds rows of setting(s) this config does not have: {', '.join(map(str, foreign[:3]))}"
    return keys.append_column("file", pa.array([name] * keys.num_rows, pa.string())), ""


def read_certify_log(path: str | Path, sigma: float, alpha: float = 0.001, n: int = 100_000,
                     n0: int = 100) -> pa.Table:
    """Rows of this schema from a certify.py log of Cohen et al.'s reference code
    (`idx label predict radius correct time`), so the report can be checked against published results.
    The log does not record p_lower, counts or the seed: those columns are null or 0."""
    from datetime import timedelta

    def seconds(text: str) -> float:
        if ":" not in text:
            return float(text)
        hours, minutes, rest = text.split(":")
        return timedelta(hours=int(hours), minutes=int(minutes), seconds=float(rest)).total_seconds()

    lines = Path(path).read_text().splitlines()
    if lines[0].split() != ["idx", "label", "predict", "radius", "correct", "time"]:
        raise ValueError(f"{path}: not a certify.py log (header {lines[0]!r})")
    cohen = Cohen(sigma=sigma, alpha=alpha, n0=n0, n=n, gaussian="real")
    context = RowContext(seed=0, precision="fp32", device="cuda")
    rows = []
    for line in lines[1:]:
        idx, label, predict, radius, _, time = line.split("\t")
        certificate = Certificate(prediction=int(predict), radius=float(radius), cost=Cost(n=n, n0=n0),
                                  topk_labels=None if int(predict) == -1 else [int(predict)],
                                  details={"source": str(path)})
        row = result_row(cohen, certificate, int(idx), idx, int(label), seconds(time), context)
        # the settings are as stated, not recorded (the largest radii in Cohen et al.'s logs exceed those
        # their stated n and alpha allow), so no largest radius is claimed for them
        rows.append({**row, "max_radius": None})
    return to_table(rows)


def code_version() -> str:
    """This package's version, plus the git commit (and '-dirty') when it runs from a checkout."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("pipeline")
    except PackageNotFoundError:
        text = "unknown"
    try:
        root = Path(__file__).resolve().parents[1]
        commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=root,
                                capture_output=True, text=True, timeout=10)
        if commit.returncode == 0 and commit.stdout.strip():
            text += f"+g{commit.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return text


def environment() -> dict:
    """What a manifest records about the software and machine that ran it."""
    import platform
    import socket
    from importlib.metadata import PackageNotFoundError, version

    packages = {}
    for name in ("torch", "torchvision", "ray", "numpy", "scipy", "pyarrow", "timm", "transformers", "safetensors"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {"code_version": code_version(), "packages": packages, "python": platform.python_version(),
            "driver_host": socket.gethostname()}


def _weights_sha256(manifest: dict, key: str) -> str | None:
    """The weights digest a manifest records for the classifier, or for the denoiser (one record per sigma,
    all of the same file)."""
    record = manifest.get(key) or {}
    if key == "denoiser":
        record = next(iter(record.values()), None) or {}
    return record.get("weights_sha256")


def manifest_matches(earlier: dict, current: dict) -> None:
    """Raises ValueError when a run id is reused with settings that would change its results. Sections are
    compared as their typed specs, so a manifest that spelled out only some keys (or was written before a
    setting existed) matches the same settings given with their defaults."""
    keys = ("certifiers", "dataset", "model", "seed", "precision", "channels_last", "compile")
    added_later = {"channels_last": False, "compile": False}  # runs written before these settings existed
    sections = {"dataset": DatasetSpec, "model": ModelSpec}

    def setting(config: dict, key: str):
        value = config.get(key, added_later.get(key))
        return sections[key](**value) if key in sections and isinstance(value, dict) else value

    changed = [key for key in keys if setting(earlier.get("config", {}), key) != setting(current["config"], key)]
    for what, key in (("model weights", "classifier"), ("denoiser weights", "denoiser")):
        digests = [_weights_sha256(manifest, key) for manifest in (earlier, current)]
        if None not in digests and digests[0] != digests[1]:
            changed.append(f"{what} (the file's SHA-256 was {digests[0][:12]}..., is {digests[1][:12]}...)")
    if changed:
        raise ValueError(f"run {current['run_id']!r} already exists with different {', '.join(changed)}; "
                         f"resume it with the same settings or choose another run_id")
