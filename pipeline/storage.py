"""Local paths and object storage behind one interface: pyarrow's filesystem layer.

`s3://bucket/prefix` goes through `pyarrow.fs.S3FileSystem` with credentials and region from the standard
AWS chain; `endpoint_url` (or the AWS_ENDPOINT_URL variable) points it at any S3-speaking server.
Writes of whole files are atomic: a reader sees a file completely or not at all (a local write goes to a
hidden `.NAME.<id>.partial` file first, removed when the write fails; `remove_partials` clears those an
earlier, killed process left). A write that fails for good (a full disk, a deleted bucket) raises
WriteFailed, one line naming the file and the reason. An object store that
cannot be reached (connection refused or reset, timeouts, 5xx, throttling) is retried with exponential
backoff for `retry_seconds` (default 120 s) before the operation fails with one StorageOutage naming it;
errors that retrying cannot cure (a missing key, access denied) fail at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import Field

from pipeline.sections import Number, Section, is_name

__all__ = ["DEFAULT_STORAGE", "RETRY_SECONDS", "Location", "Storage", "StorageError", "StorageOutage", "WriteFailed",
           "check_writable", "is_name", "is_transient", "open_location", "retrying"]

RETRY_SECONDS = 120.0
# what pyarrow's S3 layer says when the store is unreachable or overloaded, as opposed to a refusal
TRANSIENT = ("NETWORK_CONNECTION", "curlCode", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE", "SLOW_DOWN",
             "REQUEST_TIMEOUT", "THROTTLING", "Connection refused", "Connection reset", "timed out",
             "Couldn't connect", "Could not connect", "Broken pipe")
T = TypeVar("T")
log = logging.getLogger(__name__)


class StorageError(OSError):
    """Output or input storage that cannot be used; the message names the bucket or path."""


class StorageOutage(StorageError):
    """Object storage that stayed unreachable for the whole retry time; a rerun goes on where this run
    stopped."""


class WriteFailed(StorageError):
    """A file that could not be written (no space left, the bucket gone, permission lost); the message names
    the file and the reason in one line."""


def is_transient(error: BaseException) -> bool:
    """True for an OSError that says the store is unreachable or overloaded (worth retrying)."""
    return (isinstance(error, OSError) and not isinstance(error, (FileNotFoundError, StorageError))
            and any(marker.lower() in str(error).lower() for marker in TRANSIENT))


def retrying(operation: Callable[[], T], what: str, seconds: float) -> T:
    """operation(), retried with exponential backoff (0.5 s doubling to 10 s) while it fails transiently,
    for at most `seconds`; then StorageOutage saying what could not be done, in one line."""
    deadline, delay, warned = time.monotonic() + seconds, 0.5, False
    while True:
        try:
            return operation()
        except OSError as error:
            if not is_transient(error):
                raise
            if time.monotonic() + delay > deadline:
                raise StorageOutage(f"{what}: object storage unreachable for {seconds:g} s "
                                    f"(storage.retry_seconds); last error: {_first_line(error)}") from error
            if not warned:
                log.warning("%s: object storage unreachable (%s); retrying for up to %g s", what,
                            _first_line(error), seconds)
                warned = True
            time.sleep(delay)
            delay = min(2 * delay, 10.0)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


@dataclass(frozen=True)
class Location:
    """A directory on a filesystem: `fs` and the path inside it, plus the URI the user gave."""

    fs: pafs.FileSystem
    path: str
    uri: str
    retry_seconds: float = 0.0  # how long an unreachable object store is retried (local paths never are)

    def join(self, *parts: str) -> Location:
        """The location below this one; every part is one path segment (StorageError for '', '.', '..' or a
        part holding a separator), so no join leaves its root."""
        for part in parts:
            if part in ("", ".", "..") or "/" in part or "\\" in part:
                raise StorageError(f"{part!r} is not one path segment (below {self.uri})")
        path = "/".join([self.path.rstrip("/"), *parts]) if self.path else "/".join(parts)
        uri = "/".join([self.uri.rstrip("/"), *parts])
        return Location(self.fs, path, uri, self.retry_seconds)

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def retrying(self, operation: Callable[[], T], what: str) -> T:
        """operation() with this location's retries of an unreachable object store (`retrying`)."""
        return retrying(operation, f"{what} {self.uri}", self.retry_seconds) if self.is_s3 else operation()

    def exists(self) -> bool:
        return self.retrying(lambda: self.fs.get_file_info(self.path).type != pafs.FileType.NotFound, "checking")

    def entries(self) -> list[pafs.FileInfo]:
        """What lies directly in this directory (nothing if it does not exist)."""
        return self.retrying(lambda: self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True)),
                             "listing")

    def list_files(self, suffix: str = "") -> list[str]:
        """Paths of the files directly in this directory whose names end with `suffix`, sorted."""
        return sorted(i.path for i in self.entries() if i.type == pafs.FileType.File and i.base_name.endswith(suffix))

    def write_bytes(self, name: str, data: bytes) -> None:
        self._atomic(name, lambda stream: stream.write(data))

    def write_json(self, name: str, value) -> None:
        self.write_bytes(name, json.dumps(value, indent=2, sort_keys=True, default=str).encode())

    def read_bytes(self, name: str) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self.join(name).path) as stream:
                return stream.read()

        return self.retrying(read, f"reading {name} from")

    def read_json(self, name: str):
        return json.loads(self.read_bytes(name))

    def write_parquet(self, name: str, table: pa.Table) -> None:
        self._atomic(name, lambda stream: pq.write_table(table, stream))

    def read_parquet(self, name: str, columns: list[str] | None = None) -> pa.Table:
        """The Parquet file `name` in this directory as a table, all columns or `columns` (pyarrow's errors for
        a file that is not one)."""
        return self.retrying(lambda: pq.read_table(self.join(name).path, filesystem=self.fs, columns=columns),
                             f"reading {name} from")

    def remove_partials(self) -> int:
        """Removes the `.partial` files of writes that never completed (a process killed mid-write, a full
        disk) directly in this directory; returns how many. Call it only while no other process writes here."""
        stale = [path for path in self.list_files(".partial") if path.rsplit("/", 1)[-1].startswith(".")]
        for path in stale:
            self.fs.delete_file(path)
        return len(stale)

    def _atomic(self, name: str, write) -> None:
        """Writes `name` whole or not at all; WriteFailed (naming the file) when it cannot be written."""
        target = self.join(name)
        try:
            if self.is_s3:  # an S3 object appears only once its upload completes; a retry uploads it anew

                def upload() -> None:
                    with self.fs.open_output_stream(target.path) as stream:
                        write(stream)

                self.retrying(upload, f"writing {name} to")
                return
            self.fs.create_dir(self.path, recursive=True)
            partial = self.join(f".{name}.{uuid.uuid4().hex}.partial").path
            try:
                with self.fs.open_output_stream(partial) as stream:
                    write(stream)
                self.fs.move(partial, target.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    self.fs.delete_file(partial)
                raise
        except StorageError:
            raise
        except OSError as error:
            raise WriteFailed(f"cannot write {target.uri}: {_first_line(error)}") from error


def _s3_filesystem(endpoint_url: str | None, region: str | None) -> pafs.S3FileSystem:
    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    options = {"region": region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")}
    if endpoint_url:
        parsed = urlparse(endpoint_url if "://" in endpoint_url else f"https://{endpoint_url}")
        options.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    options["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=3)
    return pafs.S3FileSystem(**{key: value for key, value in options.items() if value is not None})


def open_location(uri: str, endpoint_url: str | None = None, region: str | None = None,
                  retry_seconds: float = RETRY_SECONDS) -> Location:
    """The directory at a local path or `s3://bucket/prefix`."""
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise StorageError(f"{uri}: an s3 URI needs a bucket, as in s3://bucket/prefix")
        fs = _s3_filesystem(endpoint_url, region)
        return Location(fs, f"{parsed.netloc}{parsed.path}".rstrip("/"), uri.rstrip("/"), retry_seconds)
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"{uri}: unsupported storage; use a local path or s3://bucket/prefix")
    path = os.path.abspath(uri.removeprefix("file://"))
    return Location(pafs.LocalFileSystem(), path, path)


class Storage(Section):
    """How to reach object storage: the `endpoint_url` of an S3-speaking server (default: AWS_ENDPOINT_URL,
    else AWS), the `region`, and how long an unreachable store is retried (`retry_seconds`); credentials
    always come from the standard AWS chain. Local paths need none of it. Every URI a configuration names is
    opened through one of these."""

    endpoint_url: str | None = None
    region: str | None = None
    retry_seconds: Number = Field(RETRY_SECONDS, ge=0.0)

    def open(self, uri: str) -> Location:
        """The directory (or file) at a local path or `s3://bucket/prefix`."""
        return open_location(uri, self.endpoint_url, self.region, self.retry_seconds)


DEFAULT_STORAGE = Storage()  # endpoint and region from the environment


def check_writable(location: Location) -> None:
    """Fails fast, naming the bucket or directory, when the location cannot be written."""
    if location.is_s3:
        bucket = location.path.split("/", 1)[0]
        try:
            info = location.retrying(lambda: location.fs.get_file_info(bucket), "checking the bucket of")
        except OSError as error:
            raise StorageError(f"cannot reach bucket {bucket!r} for {location.uri}: {error}") from error
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"bucket {bucket!r} does not exist (output {location.uri})")
    probe = f".write-check-{uuid.uuid4().hex}"
    try:
        location.write_bytes(probe, b"ok")
        location.fs.delete_file(location.join(probe).path)
    except OSError as error:
        reason = error.__cause__ if isinstance(error, WriteFailed) and error.__cause__ is not None else error
        raise StorageError(f"cannot write to {location.uri}: {reason}") from error
