"""A lease on a run folder: one run of a run id at a time, on local disk and on S3.

The holder writes `lease.json` (owner, host, process, expiry) and renews it while it works; another run of
the same id refuses while the lease is live. A lease is over when it expires (LEASE_SECONDS after its last
renewal), or at once when its process is gone from this host (so a rerun after a kill takes over), or when
it belongs to this very process (an earlier run that failed before releasing it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from pipeline.storage import Location

LEASE = "lease.json"
LEASE_SECONDS = 120.0
RENEW_SECONDS = 30.0

__all__ = ["LEASE", "Lease", "RunBusy", "acquire"]


class RunBusy(RuntimeError):
    """Another live run holds the run folder; the message says who and until when."""


@dataclass
class Lease:
    """This process's lease on `location`."""

    location: Location
    owner: str

    def renew(self) -> None:
        self.location.write_json(LEASE, {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                                         "expires": time.time() + LEASE_SECONDS})

    def release(self) -> None:
        """Removes the lease, if it is still this one (at once or not at all: an unreachable store is not
        waited for, the lease then simply expires)."""
        location = dataclasses.replace(self.location, retry_seconds=0.0)
        with contextlib.suppress(OSError, ValueError):
            if location.read_json(LEASE).get("owner") == self.owner:
                location.fs.delete_file(location.join(LEASE).path)

    @contextlib.contextmanager
    def kept(self):
        """Renews the lease every RENEW_SECONDS in a background thread while the block runs; releases it at
        the end, whatever happens."""
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(RENEW_SECONDS):
                with contextlib.suppress(OSError):
                    self.renew()

        thread = threading.Thread(target=renew, name="lease", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            self.release()


def acquire(location: Location, name: str) -> Lease:
    """This process's lease on the run folder `location`; RunBusy when another live run holds it."""
    holder = _live_holder(location)
    if holder is not None:
        until = time.strftime("%H:%M:%S UTC", time.gmtime(holder["expires"]))
        raise RunBusy(f"run {name} is in progress: process {holder['pid']} on {holder['host']} holds {location.uri} "
                      f"(lease renewed until {until}); wait for it to end, or use another run_id")
    lease = Lease(location, uuid.uuid4().hex)
    lease.renew()
    if location.read_json(LEASE).get("owner") != lease.owner:  # another run wrote its lease at the same moment
        raise RunBusy(f"run {name} was started by another process at the same moment; wait for it, or use "
                      f"another run_id")
    return lease


def _live_holder(location: Location) -> dict | None:
    if not location.join(LEASE).exists():
        return None
    try:
        holder = location.read_json(LEASE)
    except (OSError, ValueError):
        return None  # a lease that cannot be read protects nothing
    if holder.get("expires", 0) < time.time():
        return None
    here = holder.get("host") == socket.gethostname()
    if here and (holder.get("pid") == os.getpid() or not _running(int(holder.get("pid", -1)))):
        return None
    return holder


def _running(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
