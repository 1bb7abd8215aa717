"""Runs the `pipeline` command line in this process and SIGKILLs the process at a chosen atomic write.

    KILL_AT=<file name>:<n>:<before|during|after> python tests/kill_at.py sweep --config ...

kills it at the n-th write of that file name (counted in this process): before the write starts, while it is
half done (the data in a partial file beside the target, which is never renamed into place), or right after
it lands. Without KILL_AT the command runs normally.
"""

import os
import signal
import sys

from pipeline import cli, storage


def arm(name: str, count: int, when: str) -> None:
    original, seen = storage.Location._atomic, [0]

    def atomic(self, target: str, write) -> None:
        if target == name:
            seen[0] += 1
        if target != name or seen[0] != count:
            return original(self, target, write)
        if when == "during":
            self.fs.create_dir(self.path, recursive=True)
            with self.fs.open_output_stream(self.join(f".{target}.killed.partial").path) as stream:
                write(stream)
        if when == "after":
            original(self, target, write)
        os.kill(os.getpid(), signal.SIGKILL)
        return None

    storage.Location._atomic = atomic


if __name__ == "__main__":
    if os.environ.get("KILL_AT"):
        name, count, when = os.environ["KILL_AT"].split(":")
        arm(name, int(count), when)
    sys.exit(cli.main(sys.argv[1:]))
