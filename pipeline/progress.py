"""One progress display for a long task: a tqdm bar on a terminal, compact log lines elsewhere.

`Progress(total, unit, description)` counts work done (and failures) towards `total` and shows the count,
the rate, the ETA and any fields the task adds (a loss, the best trial so far). On a terminal it is one
tqdm bar on stderr, redrawn every second even while no work finishes, so the elapsed time moves. Anywhere
else (a log file, `ray job logs`, a pipe) it writes a log line when the work crosses another tenth of the
total, and otherwise after `first_line` seconds, then once a minute (`heartbeat`) until the first unit is
done and every three minutes after that, with never two tenths' lines within `min_interval` seconds: a long
task writes a dozen or two lines, not thousands. Rate and ETA are measured from the first finished unit on
(once that is `min_interval` seconds back), so the start-up (starting Ray, loading models) does not
inflate the ETA.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

__all__ = ["Progress", "format_duration"]

log = logging.getLogger("pipeline.progress")


def format_duration(seconds: float) -> str:
    """'42 s', '3 min 05 s', '2 h 07 min'; '?' when not finite."""
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        return "?"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Work done of `total` (`update`; `initial` units were done before), shown as a tqdm bar on a terminal
    (`tty`, default: whether stderr is one) or as lines on `logger` (or through `emit(line)`); `close` (or
    leaving the `with` block) shows the final state."""

    def __init__(self, total: int, unit: str = "images", description: str = "certifying",
                 logger: logging.Logger | None = None, tty: bool | None = None, min_interval: float = 10.0,
                 heartbeat: float = 60.0, initial: int = 0, emit=None, first_line: float = 5.0,
                 clock=time.monotonic):
        self.total, self.unit, self.description = int(total), unit, description
        self.emit = emit or (logger or log).info
        self.initial = self.done = int(initial)
        self.failed = 0
        self.fields: dict[str, str] = {}
        self.min_interval, self.heartbeat, self.first_line, self.clock = min_interval, heartbeat, first_line, clock
        self.started = self.clock()
        self._last_line, self._shown = self.started, None
        self._logged_tenths = self._tenths()
        self._first: tuple[float, int] | None = None  # (time, units done) at the first update
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._bar = self._redirect = None
        if sys.stderr.isatty() if tty is None else tty:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._redirect = logging_redirect_tqdm()  # log lines print above the bar, not through it
            self._redirect.__enter__()
            self._bar = tqdm(total=self.total, initial=self.done, unit=f" {unit}", desc=description,
                             dynamic_ncols=True, smoothing=0.1, file=sys.stderr)
        self._thread = threading.Thread(target=self._tick, name="progress", daemon=True)
        self._thread.start()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(final_line=exc_type is None)  # a failure's traceback says the rest

    def update(self, done: int = 1, failed: int = 0, **fields) -> None:
        """`done` more units finished, `failed` of them failed; `fields` (name -> value) are shown beside."""
        with self._lock:
            self.done += int(done)
            if self._first is None and done:
                self._first = (self.clock(), self.done)
            self.failed += int(failed)
            self.fields.update({key: _text(value) for key, value in fields.items()})
            if self._bar is not None:
                self._bar.set_postfix_str(self._postfix(), refresh=False)
                self._bar.update(int(done))
            elif self._tenths() > self._logged_tenths and self.clock() - self._last_line >= self.min_interval:
                self._log_line()

    def line(self) -> str:
        """The state as one line: description, done/total, percent, rate, ETA, failures and the fields."""
        now = self.clock()
        elapsed = max(now - self.started, 1e-9)
        rate = (self.done - self.initial) / elapsed
        if self._first is not None and self.done > self._first[1] and now - self._first[0] >= self.min_interval:
            rate = (self.done - self._first[1]) / (now - self._first[0])  # steady state, after the start-up
        percent = 100 * self.done / self.total if self.total else 100.0
        text = f"{self.description}: {self.done}/{self.total} {self.unit} ({percent:.0f}%), "
        if self.done == self.initial:
            text += f"elapsed {format_duration(elapsed)}, none finished yet"
        else:
            eta = (self.total - self.done) / rate if self.done < self.total else 0.0
            text += f"{_rate(rate, self.unit)}, elapsed {format_duration(elapsed)}, ETA {format_duration(eta)}"
        return f"{text}, {self._postfix()}" if self._postfix() else text

    def close(self, final_line: bool = True) -> None:
        """Stops the display; off a terminal the last state gets a final line (unless `final_line` is False
        or a line already shows it)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._thread.join(timeout=2)
        with self._lock:
            if self._bar is not None:
                self._bar.set_postfix_str(self._postfix(), refresh=False)
                self._bar.close()
                self._redirect.__exit__(None, None, None)
            elif final_line and (self._shown != (self.done, self.failed) or self._last_line == self.started):
                self._log_line()

    def _postfix(self) -> str:
        parts = [f"{self.failed} failed"] if self.unit == "images" or self.failed else []
        return ", ".join(parts + [f"{key} {value}" for key, value in self.fields.items()])

    def _tenths(self) -> int:
        return 10 * self.done // self.total if self.total else 10

    def _log_line(self) -> None:
        self.emit(self.line())
        self._last_line, self._logged_tenths, self._shown = self.clock(), self._tenths(), (self.done, self.failed)

    def _tick(self) -> None:
        """Every second until closed: `_tick_once`."""
        while not self._closed.wait(1.0):
            self._tick_once()

    def _tick_once(self) -> None:
        """Redraws the bar; off a terminal, writes the heartbeat line when one is due."""
        with self._lock:
            if self._bar is not None:
                self._bar.refresh()
            elif self.clock() - self._last_line >= self._first_or_heartbeat():
                self._log_line()

    def _first_or_heartbeat(self) -> float:
        """The first line comes after `first_line` seconds (so a slow start still shows life), then one a
        `heartbeat` while nothing is done, then one every three heartbeats (the tenths say the rest)."""
        if self._last_line == self.started:
            return self.first_line
        return self.heartbeat if self.done == self.initial else 3 * self.heartbeat


def _rate(rate: float, unit: str) -> str:
    if rate >= 1 or rate == 0:
        return f"{rate:.2f} {unit}/s"
    return f"{1 / rate:.1f} s per {unit.rstrip('s')}"


def _text(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
