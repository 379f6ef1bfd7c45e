"""Write output shards: created at full size with their header, tensors put at their offsets.

A shard file is created once at its full size (`prepare_shard`); each tensor's bytes then
go to their own range with `pwrite` (`write_at`), from any worker that sees the output
directory, in any order. No step truncates a file that other writes may already have
filled. The blocks are reserved up front (fallocate) where the filesystem allows, so a full
disk shows before any tensor.

Nothing written into OUT follows a symlink or shares its inode: a shard is a new file
(whatever had its name, a link to a file elsewhere included, is unlinked first, and the
file is created with O_EXCL | O_NOFOLLOW), writes open it with O_NOFOLLOW, and other files
are replaced whole (`replace_file`: a new temporary file renamed over the name).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import tempfile
from functools import lru_cache
from pathlib import Path

from mergeflow.plan.shards import ShardPlan

NOFOLLOW = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def prepare_shard(path: Path, shard: ShardPlan, keep: bool = False) -> bool:
    """Create the shard at full size with its header; with `keep`, leave an already
    prepared one (a regular file of its own, planned size and header) alone.

    Returns True when an existing, matching shard was kept (its tensors may be written)."""
    if keep:
        fd = _open_own(path)
        if fd is not None:
            try:
                if os.fstat(fd).st_size == shard.size and os.pread(fd, len(shard.header), 0) == shard.header:
                    allocate(fd, shard.size)
                    return True
            finally:
                os.close(fd)
    fd = create_file(path)
    try:
        os.ftruncate(fd, shard.size)  # sparse: the tensors fill it
        try:
            allocate(fd, shard.size)
        except OSError:
            os.ftruncate(fd, 0)  # give the space back; this shard held nothing yet
            raise
        _pwrite_all(fd, shard.header, 0)
        return False
    finally:
        os.close(fd)


def create_file(path: Path) -> int:
    """A new, empty file at `path` opened for reading and writing; whatever was there (a
    file, a link to a file elsewhere: that file stays as it is) is unlinked first."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o644)


def replace_file(path: Path, data: bytes) -> None:
    """Put `data` at `path` atomically: a new file in the same directory, renamed over the
    name (a symlink there is replaced, never followed)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _open_own(path: Path) -> int | None:
    """`path` opened read-write if it is a regular file with no other name, else None."""
    try:
        fd = os.open(path, os.O_RDWR | NOFOLLOW)
    except OSError:
        return None
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
        return fd
    os.close(fd)
    return None


def allocate(fd: int, size: int) -> None:
    """Reserve the file's blocks (Linux fallocate, mode 0: no data is changed), so a full disk
    fails here, before any tensor is read. Where the filesystem cannot (EOPNOTSUPP, not
    Linux) the file stays sparse; glibc's posix_fallocate would write zeros instead."""
    fallocate = _libc_fallocate()
    if fallocate is None or size == 0:
        return
    if fallocate(fd, 0, 0, size) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err))


@lru_cache(maxsize=1)
def _libc_fallocate():
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


def write_at(path: str, offset: int, data: memoryview) -> None:
    """Write `data` at `offset` of an existing file (idempotent, never truncates)."""
    fd = os.open(path, os.O_WRONLY | NOFOLLOW)
    try:
        _pwrite_all(fd, data, offset)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def sync_file(path: str) -> int:
    """fsync a finished shard; return its size."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)
