"""Read the small files of a model directory without trusting them.

Every input file is stat()ed before it is opened: a FIFO, a device or a socket in place of
a weights file or config.json is refused by name (opening a FIFO for reading blocks until a
writer comes, so it would hang the merge forever). Files are then opened non-blocking and
checked again on the open descriptor, so a file swapped in between cannot hang it either.
JSON files must decode as UTF-8, parse (a document nested deeper than the parser's
recursion limit is refused, not a crash) and be one JSON object.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mergeflow.errors import MergeflowError

MAX_JSON = 64 * 1024 * 1024  # config.json, indexes, tokenizer files: far below this in practice


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def stat_path(path: Path, what: str) -> os.stat_result | None:
    """os.stat of `path` (following links); None when nothing is there. A symlink loop or an
    unreadable parent is a MergeflowError naming `what`."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise MergeflowError(f"{what} {path}: is a symlink loop (a link that points back to "
                                 "itself); fix or remove the link") from None
        raise MergeflowError(f"{what} {path}: cannot read it ({e.strerror or e})") from None


def open_regular(path: Path, what: str) -> tuple[int, int]:
    """(file descriptor, size) of a regular file opened read-only; the caller closes it."""
    st = stat_path(path, what)
    if st is None:
        raise MergeflowError(f"{path}: cannot read it (No such file or directory)")
    if not stat.S_ISREG(st.st_mode):
        raise MergeflowError(f"{path}: cannot read it: it is {_kind(st.st_mode)}, not a file; "
                             f"the {what} must be a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise MergeflowError(f"{path}: cannot read it ({e.strerror or e})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # swapped since the stat above
        os.close(fd)
        raise MergeflowError(f"{path}: cannot read it: it is {_kind(st.st_mode)}, not a file")
    return fd, st.st_size


def read_exact(fd: int, offset: int, n: int) -> bytes:
    """n bytes at offset (fewer only at the end of the file)."""
    chunks, got = [], 0
    while got < n:
        chunk = os.pread(fd, n - got, offset + got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_small(path: Path, what: str, limit: int = MAX_JSON) -> bytes:
    """The bytes of a small regular file (at most `limit`)."""
    fd, size = open_regular(path, what)
    try:
        if size > limit:
            raise MergeflowError(f"{path}: the {what} is {size} bytes; over {limit} bytes is not a "
                                 f"plausible {what}")
        return read_exact(fd, 0, size)
    except OSError as e:
        raise MergeflowError(f"{path}: cannot read it ({e.strerror or e})") from None
    finally:
        os.close(fd)


def parse_json(data: bytes, where: str, *, hook: Callable[[list], Any] | None = None) -> dict[str, Any]:
    """One JSON object from UTF-8 bytes; `where` starts every message."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MergeflowError(f"{where}: not UTF-8 text (byte {e.start}); re-download or re-save it") from None
    try:
        value = json.loads(text, object_pairs_hook=hook)
    except RecursionError:
        raise MergeflowError(f"{where}: JSON nested too deeply to be a real file; re-download or "
                             "re-save it") from None
    except ValueError as e:
        raise MergeflowError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise MergeflowError(f"{where}: not a JSON object (it is a JSON {type(value).__name__})")
    return value


def load_json(path: Path, what: str) -> dict[str, Any]:
    """A small JSON file that must hold one object (config.json, an index, tokenizer files)."""
    return parse_json(read_small(path, what), f"{path}: cannot read the {what}")


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object_pairs_hook refusing a key given twice (the last would silently win)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out
