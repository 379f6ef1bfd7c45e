"""Terminal progress for a running merge, and the summary printed at the end.

One line, redrawn in place on a terminal (a line every few seconds otherwise): tensors
done, bytes written, throughput and ETA. Fed by the scheduler hooks in run.py.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass

from mergeflow.spec.sizes import human_bytes, human_time


@dataclass
class Progress:
    total_tensors: int
    total_bytes: int
    quiet: bool = False
    stream: object = None
    done_tensors: int = 0
    done_bytes: int = 0
    started: float = 0.0
    _last: float = 0.0

    def __post_init__(self) -> None:
        self.stream = self.stream or sys.stderr
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self.done_tensors += 1
            self.done_bytes += nbytes
            now = time.monotonic()
            if not self.quiet and (now - self._last >= (0.2 if self._tty else 5.0)
                                   or self.done_tensors == self.total_tensors):
                self._last = now
                self._draw(now)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.started, 1e-9)
        rate = self.done_bytes / elapsed
        left = (self.total_bytes - self.done_bytes) / rate if rate > 0 else 0
        frac = self.done_bytes / self.total_bytes if self.total_bytes else 1.0
        bar = "#" * int(frac * 24)
        return (f"[{bar:<24}] {self.done_tensors}/{self.total_tensors} tensors, "
                f"{human_bytes(self.done_bytes)}/{human_bytes(self.total_bytes)} written, "
                f"{human_bytes(rate)}/s, ETA {human_time(left)}")

    def _draw(self, now: float) -> None:
        text = self.line(now)
        if self._tty:
            self.stream.write("\r" + text + "\x1b[K")
            if self.done_tensors == self.total_tensors:
                self.stream.write("\n")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
