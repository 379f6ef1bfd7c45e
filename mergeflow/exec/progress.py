"""Terminal progress of a running merge: tensors done, bytes written, speed and ETA (tqdm).

On a terminal, one tqdm bar redrawn in place and fitted to the terminal's width (tqdm trims
what does not fit, so a redraw never wraps). Elsewhere (a CI log, a file), a plain line
every INTERVAL seconds and one at the end, formatted by tqdm the same way. Messages printed
while a bar is shown go through `write`, which clears the bar first. Fed by the scheduler
hooks in run.py.
"""

from __future__ import annotations

import sys
import threading
import time

from tqdm import tqdm

BAR_FORMAT = ("merging {percentage:3.0f}%|{bar}| {tensors} tensors, {n_fmt}B/{total_fmt}B, "
              "{rate_fmt}, ETA {remaining}")
INTERVAL = 5.0  # seconds between plain lines off a terminal
REDRAW = 0.2  # seconds between redraws of the bar on a terminal


class _Bar(tqdm):
    """A tqdm bar that also shows `tensors` ("12/39")."""

    tensors = ""

    @property
    def format_dict(self):
        return {**super().format_dict, "tensors": self.tensors}


class Progress:
    """Progress of `total_tensors` tensors holding `total_bytes`, drawn on `stream`."""

    def __init__(self, total_tensors: int, total_bytes: int, *, quiet: bool = False, stream=None,
                 tty: bool | None = None) -> None:
        self.total_tensors, self.total_bytes, self.quiet = total_tensors, total_bytes, quiet
        self.stream = stream or sys.stderr
        self.tty = tty if tty is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self.done_tensors = self.done_bytes = 0
        self.started = time.monotonic()
        self._last = 0.0
        self._bar: _Bar | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Show the bar (on a terminal) from now on; the clock starts here."""
        self.started = time.monotonic()
        if self.quiet or not self.tty or self._bar is not None:
            return
        self._bar = _Bar(total=self.total_bytes, unit="B", unit_scale=True, unit_divisor=1000,
                         file=self.stream, dynamic_ncols=True, mininterval=REDRAW, leave=True,
                         bar_format=BAR_FORMAT, smoothing=0.1, delay=0)
        self._bar.tensors = self._count()
        self._bar.refresh()

    def advance(self, nbytes: int) -> None:
        """One more tensor is written, holding `nbytes`."""
        with self._lock:
            self.done_tensors += 1
            self.done_bytes += nbytes
            if self._bar is not None:
                self._bar.tensors = self._count()
                self._bar.update(nbytes)
                return
            now = time.monotonic()
            last = self.done_tensors == self.total_tensors
            if not self.quiet and not self.tty and (now - self._last >= INTERVAL or last):
                self._last = now
                print(self.line(now), file=self.stream, flush=True)

    def write(self, message: str) -> None:
        """Print a line of its own, above the bar if one is shown."""
        with self._lock:
            if self._bar is not None:
                self._bar.write(message, file=self.stream)
            else:
                print(message, file=self.stream, flush=True)

    def close(self) -> None:
        """Leave the bar's last state on its own line."""
        with self._lock:
            if self._bar is not None:
                self._bar.tensors = self._count()
                self._bar.close()
                self._bar = None

    def line(self, now: float | None = None) -> str:
        """The progress as one plain line (ASCII bar, full width)."""
        elapsed = (now if now is not None else time.monotonic()) - self.started
        return tqdm.format_meter(self.done_bytes, self.total_bytes, elapsed, ascii=True,
                                 unit="B", unit_scale=True, unit_divisor=1000,
                                 bar_format=BAR_FORMAT.replace("{bar}", "{bar:24}"),
                                 tensors=self._count())

    def _count(self) -> str:
        return f"{self.done_tensors}/{self.total_tensors}"
