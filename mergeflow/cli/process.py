"""Configure the process for a merge: allocator, huge pages, warnings and log noise.

The only place (with the command modules) that changes process-wide state; library code
never does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

THP_ENV = "THP_MEM_ALLOC_ENABLE"


class _TaskErrorEcho(logging.Filter):
    """Drops distributed's own report of a failed task: the error reaches the user once, below."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Compute Failed") or "ended with CancelledError" in msg)


@contextlib.contextmanager
def _terminal(verbose: bool):
    """Unless -v: warnings as one `warning:` line each and no worker tracebacks; restored after."""
    if verbose:
        yield
        return
    echo = _TaskErrorEcho()
    loggers = [logging.getLogger(n) for n in ("distributed.worker", "distributed.worker.state_machine")]
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *args, **kwargs: print(f"warning: {message}", file=sys.stderr)
        for logger in loggers:
            logger.addFilter(echo)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(echo)


def _return_freed_memory() -> None:
    """glibc only: blocks of 4 MB and more are mmapped and unmapped when freed, in this process
    and its worker processes. By default glibc raises that threshold as big blocks are freed and
    then keeps freed tensors in its arenas: a merge in row blocks measured 531 MB peak instead of
    380 MB, the 2 GB linear benchmark 900 MB instead of 650 MB (for ~15% more system time).
    Smaller blocks (the float32 temporaries of a streamed merge's row chunks, memory.py)
    stay in the heap: up to 8 MB of free heap is kept instead of 128 KB, so they are reused, not
    faulted in again (the streamed 2 GB linear merge, warm: 2.4-3.5 s with these settings,
    5.7 s with 128k-element chunks under a 1 MB threshold)."""
    import ctypes

    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(4 << 20))  # read by children at start
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(8 << 20))
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, int(os.environ["MALLOC_MMAP_THRESHOLD_"]))  # M_MMAP_THRESHOLD
        libc.mallopt(-1, int(os.environ["MALLOC_TRIM_THRESHOLD_"]))  # M_TRIM_THRESHOLD
    except (OSError, AttributeError, ValueError):  # not glibc
        pass
