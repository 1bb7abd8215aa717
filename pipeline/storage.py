"""Local paths and object storage behind one interface: pyarrow's filesystem layer.

`s3://bucket/prefix` goes through `pyarrow.fs.S3FileSystem` with credentials and region from the standard
AWS chain; `endpoint_url` (or the AWS_ENDPOINT_URL variable) points it at any S3-speaking server.
Writes of whole files are atomic: a reader sees a file completely or not at all.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = ["DEFAULT_STORAGE", "Location", "Storage", "StorageError", "check_writable", "is_name", "open_location"]

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def is_name(value) -> bool:
    """True for a name that may become one path segment (a run id, a sweep or training name): letters, digits,
    '.', '_' and '-', starting with a letter or digit, so never '.', '..', hidden, or a path."""
    return isinstance(value, str) and NAME.fullmatch(value) is not None


class StorageError(OSError):
    """Output or input storage that cannot be used; the message names the bucket or path."""


@dataclass(frozen=True)
class Location:
    """A directory on a filesystem: `fs` and the path inside it, plus the URI the user gave."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def join(self, *parts: str) -> Location:
        """The location below this one; every part is one path segment (StorageError for '', '.', '..' or a
        part holding a separator), so no join leaves its root."""
        for part in parts:
            if part in ("", ".", "..") or "/" in part or "\\" in part:
                raise StorageError(f"{part!r} is not one path segment (below {self.uri})")
        path = "/".join([self.path.rstrip("/"), *parts]) if self.path else "/".join(parts)
        uri = "/".join([self.uri.rstrip("/"), *parts])
        return Location(self.fs, path, uri)

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def list_files(self, suffix: str = "") -> list[str]:
        """Paths of the files directly in this directory whose names end with `suffix`, sorted."""
        info = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted(i.path for i in info if i.type == pafs.FileType.File and i.base_name.endswith(suffix))

    def write_bytes(self, name: str, data: bytes) -> None:
        self._atomic(name, lambda stream: stream.write(data))

    def write_json(self, name: str, value) -> None:
        self.write_bytes(name, json.dumps(value, indent=2, sort_keys=True, default=str).encode())

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.join(name).path) as stream:
            return stream.read()

    def read_json(self, name: str):
        return json.loads(self.read_bytes(name))

    def write_parquet(self, name: str, table: pa.Table) -> None:
        self._atomic(name, lambda stream: pq.write_table(table, stream))

    def _atomic(self, name: str, write) -> None:
        target = self.join(name).path
        if self.is_s3:  # an S3 object appears only once its upload completes
            with self.fs.open_output_stream(target) as stream:
                write(stream)
            return
        self.fs.create_dir(self.path, recursive=True)
        partial = self.join(f".{name}.{uuid.uuid4().hex}.partial").path
        with self.fs.open_output_stream(partial) as stream:
            write(stream)
        self.fs.move(partial, target)


def _s3_filesystem(endpoint_url: str | None, region: str | None) -> pafs.S3FileSystem:
    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    options = {"region": region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")}
    if endpoint_url:
        parsed = urlparse(endpoint_url if "://" in endpoint_url else f"https://{endpoint_url}")
        options.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    options["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=3)
    return pafs.S3FileSystem(**{key: value for key, value in options.items() if value is not None})


def open_location(uri: str, endpoint_url: str | None = None, region: str | None = None) -> Location:
    """The directory at a local path or `s3://bucket/prefix`."""
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise StorageError(f"{uri}: an s3 URI needs a bucket, as in s3://bucket/prefix")
        fs = _s3_filesystem(endpoint_url, region)
        return Location(fs, f"{parsed.netloc}{parsed.path}".rstrip("/"), uri.rstrip("/"))
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"{uri}: unsupported storage; use a local path or s3://bucket/prefix")
    path = os.path.abspath(uri.removeprefix("file://"))
    return Location(pafs.LocalFileSystem(), path, path)


@dataclass(frozen=True)
class Storage:
    """How to reach object storage: the `endpoint_url` of an S3-speaking server (default: AWS_ENDPOINT_URL,
    else AWS) and the `region`; credentials always come from the standard AWS chain. Local paths need none
    of it. Every URI a configuration names is opened through one of these."""

    endpoint_url: str | None = None
    region: str | None = None

    def open(self, uri: str) -> Location:
        """The directory (or file) at a local path or `s3://bucket/prefix`."""
        return open_location(uri, self.endpoint_url, self.region)


DEFAULT_STORAGE = Storage()  # endpoint and region from the environment


def check_writable(location: Location) -> None:
    """Fails fast, naming the bucket or directory, when the location cannot be written."""
    if location.is_s3:
        bucket = location.path.split("/", 1)[0]
        try:
            info = location.fs.get_file_info(bucket)
        except OSError as error:
            raise StorageError(f"cannot reach bucket {bucket!r} for {location.uri}: {error}") from error
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"bucket {bucket!r} does not exist (output {location.uri})")
    probe = f".write-check-{uuid.uuid4().hex}"
    try:
        location.write_bytes(probe, b"ok")
        location.fs.delete_file(location.join(probe).path)
    except OSError as error:
        raise StorageError(f"cannot write to {location.uri}: {error}") from error
