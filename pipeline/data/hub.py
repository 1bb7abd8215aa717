"""Image datasets in Parquet as dataset hubs publish them (CIFAR-10, ImageNet, ...): an image column of
structs {bytes: encoded image, path: its file name} and an integer label column.

The dataset root is one Parquet file, or a folder of shards named `<split>-NNNNN-of-NNNNN.parquet` (or
`<split>.parquet`); the shards of `dataset.split` are read in name order, and the images are numbered in
that order. The image column is `dataset.image_column`, or else the one struct column with a `bytes` field;
the label column is `dataset.label_column` (`label`; null for an unlabelled set, negative labels mean none).
Image ids are the structs' `path`s where every row has one and no two are equal (so an ImageNet image keeps
the id the folder layouts give it), else `<split>/<index>`. The listing reads only labels and paths; the
bytes of the images a run certifies are read afterwards, row group by row group.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.storage import Location

__all__ = ["HubError", "HubShards", "open_shards"]


class HubError(ValueError):
    """Parquet shards that cannot be read as an image dataset; the message names the file or column."""


@dataclass(frozen=True)
class HubShards:
    """The shards of one split, their image and label columns, how many rows each holds, and whether the
    image structs carry paths."""

    root: Location
    files: list[str]
    image_column: str
    label_column: str | None
    rows: list[int]
    has_paths: bool

    def _file(self, path: str) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(self.root.fs.open_input_file(path))
        except (OSError, pa.ArrowInvalid) as error:
            raise HubError(f"cannot read the Parquet shard {path}: {error}") from error

    def labels_and_ids(self, split: str) -> tuple[list, list[str]]:
        """The labels (None where unlabelled) and image ids of every row, in dataset order."""
        columns = [f"{self.image_column}.path"] if self.has_paths else []
        columns += [self.label_column] if self.label_column else []
        labels, paths = [], []
        for path, count in zip(self.files, self.rows, strict=True):
            table = self._file(path).read(columns=columns) if columns else None
            if self.label_column:
                try:
                    labels += table[self.label_column].cast(pa.int64()).to_pylist()
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
                    raise HubError(f"dataset.label_column: {self.label_column!r} of {path} is not integer: "
                                   f"{error}") from error
            else:
                labels += [None] * count
            if self.has_paths:
                paths += [row["path"] if row else None for row in table[self.image_column].to_pylist()]
        total = sum(self.rows)
        if paths and all(paths) and len(set(paths)) == total:
            return labels, [str(path) for path in paths]
        return labels, [f"{split}/{index}" for index in range(total)]

    def read_images(self, indices: list[int]) -> list[bytes | None]:
        """The encoded bytes of the images at dataset `indices` (None where a row holds none), in that order;
        only the row groups that hold them are read."""
        wanted = sorted(set(indices))
        found: dict[int, bytes | None] = {}
        start = 0
        for path in self.files:
            shard = self._file(path)
            for group in range(shard.metadata.num_row_groups):
                size = shard.metadata.row_group(group).num_rows
                inside = [index - start for index in wanted if start <= index < start + size]
                if inside:
                    column = shard.read_row_group(group, columns=[f"{self.image_column}.bytes"])[self.image_column]
                    rows = column.take(pa.array(inside)).to_pylist()
                    found.update({start + offset: (row or {}).get("bytes") for offset, row in zip(inside, rows,
                                                                                                   strict=True)})
                start += size
        return [found[index] for index in indices]


def _split_files(root: Location, split: str) -> list[str]:
    try:
        info = root.fs.get_file_info(root.path)
    except OSError as error:
        raise HubError(f"cannot reach {root.uri}: {error}") from error
    if info.type == pafs.FileType.File:
        return [root.path]
    files = root.list_files(".parquet")
    chosen = [path for path in files if path.rsplit("/", 1)[-1].startswith((f"{split}-", f"{split}."))]
    if not chosen:
        names = [path.rsplit("/", 1)[-1] for path in files]
        raise HubError(f"no Parquet shards of split {split!r} at {root.uri} (expected {split}-NNNNN-of-NNNNN.parquet; "
                       f"found {names[:5] or 'no .parquet files'})")
    return chosen


def _image_column(schema: pa.Schema, given: str | None, path: str) -> str:
    if given is not None:
        if given not in schema.names:
            raise HubError(f"dataset.image_column: {path} has no column {given!r}; its columns: {schema.names}")
        field = schema.field(given)
        if not pa.types.is_struct(field.type) or field.type.get_field_index("bytes") < 0:
            raise HubError(f"dataset.image_column: {given!r} in {path} is {field.type}, not a struct with 'bytes'")
        return given
    candidates = [field.name for field in schema if pa.types.is_struct(field.type)
                  and field.type.get_field_index("bytes") >= 0]
    if len(candidates) != 1:
        raise HubError(f"{path}: {len(candidates)} struct columns with a 'bytes' field ({candidates}); name the image "
                       f"column with dataset.image_column")
    return candidates[0]


def open_shards(root: Location, split: str, image_column: str | None, label_column: str | None) -> HubShards:
    """The shards of `split` under `root`, their columns checked against the first shard's schema."""
    files = _split_files(root, split)
    try:
        metadata = [pq.ParquetFile(root.fs.open_input_file(path)).metadata for path in files]
    except (OSError, pa.ArrowInvalid) as error:
        raise HubError(f"cannot read the Parquet shards at {root.uri}: {error}") from error
    schema = metadata[0].schema.to_arrow_schema()
    column = _image_column(schema, image_column, files[0])
    if label_column is not None and label_column not in schema.names:
        raise HubError(f"dataset.label_column: {files[0]} has no column {label_column!r}; its columns: "
                       f"{schema.names} (null: an unlabelled dataset)")
    has_paths = schema.field(column).type.get_field_index("path") >= 0
    return HubShards(root, files, column, label_column, [meta.num_rows for meta in metadata], has_paths)
