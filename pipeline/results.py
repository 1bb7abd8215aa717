"""The result schema: one row per (image, certifier, setting), defined once as a pyarrow schema.

Every column carries its description in the schema's field metadata (`describe()` lists them), so a
Parquet file of results documents itself.
"""

from __future__ import annotations

import pyarrow as pa

_COLUMNS: list[tuple[str, pa.DataType, bool, str]] = [
    ("image_index", pa.int64(), False, "Position of the image in the batch given to the run."),
    ("image_id", pa.string(), False,
     "Stable identity of the image: the caller's id, or 'sha256:' and a hash of its pixels. It seeds the noise."),
    ("label", pa.int64(), True, "True class of the image; null when labels were not given."),
    ("certifier", pa.string(), False, "Certifier name, as in config: 'cohen', 'topk', ..."),
    ("sigma", pa.float64(), False, "Noise scale in [0, 1] pixel units."),
    ("prediction", pa.int64(), False,
     "Class the certificate is about (cohen: the smoothed prediction; topk: the label certified to stay in "
     "the top k); -1 when the certifier abstained."),
    ("abstained", pa.bool_(), False, "True when no certificate was issued (prediction -1, radius 0)."),
    ("radius", pa.float64(), False,
     "Certified radius in the row's norm, in [0, 1] pixel units; 0.0 on abstention."),
    ("norm", pa.string(), False, "Norm of the certified ball: 'l2' or 'l1'."),
    ("p_lower", pa.float64(), True,
     "Lower confidence bound on the probability under noise of the class examined (cohen: the selected top "
     "class; topk: the label), also when it abstains; null where not defined."),
    ("count", pa.int64(), True, "Estimation draws that voted for the class examined."),
    ("n", pa.int64(), False, "Estimation draws."),
    ("n0", pa.int64(), False, "Selection draws (0 when the certifier needed none)."),
    ("alpha", pa.float64(), False, "Probability that this certificate is wrong."),
    ("correct", pa.bool_(), True,
     "Certified and about the true label (prediction == label); null when labels were not given."),
    ("topk_labels", pa.list_(pa.int64()), True,
     "cohen: [prediction] unless it abstained; topk: top-k PREDICT on the estimation draws (null on abstention)."),
    ("forward_passes", pa.int64(), False,
     "Model evaluations this certificate rests on (n0 + n); passes shared between certifiers count for each."),
    ("seed", pa.int64(), False, "Run seed; with image_id it determines every noise draw."),
    ("wall_time_s", pa.float64(), False,
     "Seconds attributed to this row: sampling time shared in proportion to forward_passes, plus its own math."),
    ("status", pa.string(), False, "'ok', or 'error' when the image could not be certified."),
    ("error", pa.string(), True, "What went wrong, for rows with status 'error'."),
    ("precision", pa.string(), False,
     "Precision the model ran at ('fp32' or 'bf16'); the certificate holds for the model at that precision."),
    ("device", pa.string(), False, "Device the model ran on ('cpu', 'cuda', ...)."),
    ("params", pa.string(), False,
     "JSON of the certifier's full settings plus the noise scheme and precision."),
]

SCHEMA = pa.schema(
    [pa.field(name, dtype, nullable=nullable, metadata={"description": text})
     for name, dtype, nullable, text in _COLUMNS]
)

__all__ = ["SCHEMA", "describe", "to_table"]


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
