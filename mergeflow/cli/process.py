"""Configure the process for a merge: allocator, huge pages, warnings and where logs go.

The only place (with the command modules) that changes process-wide state; library code
never does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path

THP_ENV = "THP_MEM_ALLOC_ENABLE"


# What Dask's scheduler and workers, its dashboard (bokeh on tornado) and asyncio log: never
# the user's terminal, which shows the progress bar and mergeflow's own messages.
ROUTED_LOGGERS = ("distributed", "bokeh", "tornado", "asyncio")
LIBRARIES = tuple(f"{os.sep}{name}{os.sep}" for name in ("distributed", "bokeh", "tornado"))
PENDING = 1000  # records kept while OUT/.mergeflow does not exist yet
WORKER_LOGGING = "DASK_LOGGING"  # dask's `logging` config, read by a process importing distributed


class StateLog(logging.Handler):
    """Appends log records to OUT/.mergeflow/dask.log once the run has made that directory
    (earlier records wait in memory); never raises and never writes to the terminal."""

    def __init__(self, out_dir: str | None) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        self.out_dir = Path(out_dir).resolve() if out_dir else None
        self._fd: int | None = None
        self._pending: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + "\n"
            if self._fd is None and self.out_dir is not None:
                self._fd = _open_log(self.out_dir)
            if self._fd is None:
                self._pending = (self._pending + [text])[-PENDING:]
                return
            os.write(self._fd, ("".join(self._pending) + text).encode(errors="replace"))
            self._pending = []
        except Exception:  # a full disk must not fail the merge, nor print "Logging error"
            pass

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        super().close()


def _open_log(out_dir: Path) -> int | None:
    from mergeflow.exec.journal import LOG_FILE, NOFOLLOW, STATE_DIR

    state = out_dir / STATE_DIR
    if not state.is_dir() or state.is_symlink():
        return None
    return os.open(state / LOG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NOFOLLOW, 0o644)


@contextlib.contextmanager
def _routed_logs(out_dir: str | None, verbose: bool):
    """Dask's, bokeh's, tornado's and asyncio's records go to OUT/.mergeflow/dask.log (and,
    with -v, to stderr too) while inside, from this process and from the worker processes
    it starts (through DASK_LOGGING, which a worker reads when it imports distributed);
    the handlers and the environment are restored after."""
    if out_dir is not None:  # a run: Dask installs its handlers when imported, replaced here
        import distributed  # noqa: F401
    handler = StateLog(out_dir)
    shown = [logging.StreamHandler(sys.stderr)] if verbose else []
    saved = []
    for name in ROUTED_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers[:] = [handler, *shown]
        logger.propagate = False
    env = os.environ.get(WORKER_LOGGING)
    if out_dir is not None:
        os.environ[WORKER_LOGGING] = repr(_worker_logging(out_dir, verbose))
    try:
        yield
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers[:] = handlers
            logger.propagate = propagate
        handler.close()
        if env is None:
            os.environ.pop(WORKER_LOGGING, None)
        else:
            os.environ[WORKER_LOGGING] = env


def _worker_logging(out_dir: str, verbose: bool) -> dict:
    """The logging config (logging.config.dictConfig) of a worker process: as here."""
    handlers = {"state": {"()": f"{__name__}.StateLog", "out_dir": str(Path(out_dir).resolve())}}
    if verbose:
        handlers["stderr"] = {"class": "logging.StreamHandler"}
    loggers = {name: {"handlers": list(handlers), "propagate": False} for name in ROUTED_LOGGERS}
    loggers["distributed"]["level"] = "INFO"
    return {"version": 1, "disable_existing_loggers": False, "handlers": handlers, "loggers": loggers}


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one `warning:` line above the progress bar; the libraries' own warnings
    (Dask's, the dashboard's) go to their log instead."""
    if any(lib in str(filename) for lib in LIBRARIES):
        logging.getLogger("distributed").warning("%s: %s", category.__name__, message)
        return
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


@contextlib.contextmanager
def _terminal(verbose: bool, out_dir: str | None = None):
    """While a command runs: Dask's logs routed away from the terminal (to OUT's state
    directory when the command has an OUT), and, unless -v, each warning as one
    `warning:` line. Restored after."""
    with _routed_logs(out_dir, verbose), warnings.catch_warnings():
        if not verbose:
            warnings.showwarning = _show_warning
        yield


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
