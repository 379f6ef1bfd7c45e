"""The resume journal: which tensors of which plan are already on disk.

`OUT/.mergeflow/journal` starts with `plan <fingerprint> boot <boot id>`; each finished tensor
appends one line (`done <name>`) after its bytes are written, to a part file of its own
process (`journal-<host>-<pid>`: appends from several machines to one file on NFS can
overwrite each other). `--resume` skips those tensors; a journal of another plan (changed
config or inputs) is refused.

What a line promises: the tensor's bytes were handed to the kernel (pwrite returned) before
the line was appended, so they survive the death of any process. They do not survive a
crash of the machine before the kernel flushed them, so the header names the boot: after a
reboot nothing in the journal is trusted. Only whole lines count (a torn last line is
ignored), and a run starts by rewriting the journal to what is really on disk, before any
shard is (re)created: a shard that was missing or damaged loses its tensors' lines first.

Nothing here follows a symlink: the journal and its parts are opened with O_NOFOLLOW, and a
shard counts as on disk only as a regular file of OUT's own (not a link, not hard-linked).
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from mergeflow.errors import MergeflowError

if TYPE_CHECKING:
    from mergeflow.plan.shards import ShardPlan

STATE_DIR = ".mergeflow"
LOG_FILE = "dask.log"  # in STATE_DIR: what Dask, bokeh and tornado logged during the run
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
NOFOLLOW = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class PlanChanged(MergeflowError):
    """The journal in OUT belongs to another plan (changed config or input files)."""


def journal_path(out_dir: Path | str) -> Path:
    return Path(out_dir) / STATE_DIR / "journal"


def boot_id() -> str:
    """This boot of the machine (Linux); "-" where unknown (then reboots go unnoticed)."""
    try:
        return BOOT_ID.read_text().strip() or "-"
    except OSError:
        return "-"


def read_journal(out_dir: Path, fingerprint: str) -> tuple[set[str], bool]:
    """(finished tensors, whether the machine restarted since they were written: then the
    set is empty). No journal: nothing finished. Another plan's journal: refused."""
    path = journal_path(out_dir)
    try:
        text = _read(path)
    except FileNotFoundError:
        return set(), False
    lines = text.split("\n")[:-1]  # whole lines only
    head = lines[0].split() if lines else []
    if head[:1] != ["plan"] or head[1:2] != [fingerprint]:
        raise PlanChanged(f"{out_dir}: cannot resume: the output was started from a different config "
                          "or different input files (plan fingerprint changed)")
    booted = head[3] if head[2:3] == ["boot"] and len(head) > 3 else "-"
    if booted != "-" and booted != boot_id():
        return set(), True
    for part in _parts(out_dir):
        try:
            lines += _read(part).split("\n")[:-1]
        except FileNotFoundError:  # removed by a run starting now
            pass
    return {line[5:] for line in lines[1:] if line.startswith("done ")}, False


def has_journal(out_dir: Path) -> bool:
    return os.path.lexists(journal_path(out_dir))


def _read(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        return f.read().decode(errors="replace")


def _parts(out_dir: Path) -> list[Path]:
    return sorted(journal_path(out_dir).parent.glob("journal-*"))


def start_journal(out_dir: Path, fingerprint: str, done: Iterable[str] = ()) -> None:
    """Replace the journal (atomically) with this plan's header and the `done` tensors."""
    path = journal_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    body = f"plan {fingerprint} boot {boot_id()}\n" + "".join(f"done {n}\n" for n in sorted(done))
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o644)
    try:
        os.write(fd, body.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    for part in _parts(out_dir):  # their lines are in the new journal, or no longer true
        part.unlink(missing_ok=True)
    # this process's part, with a first block on disk while there is room (sync, threads and
    # in-process runs write from here)
    _append(_part_path(str(path)), f"part {socket.gethostname()} {os.getpid()}\n")


def on_disk(out_dir: Path, shards: Iterable[ShardPlan], done: set[str]) -> set[str]:
    """The `done` tensors whose shard is still there with the planned size and header."""
    kept = set()
    for shard in shards:
        if _shard_intact(out_dir / shard.file, shard):
            kept |= done & set(shard.tensors)
    return kept


def _shard_intact(path: Path, shard: ShardPlan) -> bool:
    """A regular file of OUT's own (no link to elsewhere) with the planned size and header."""
    try:
        fd = os.open(path, os.O_RDONLY | NOFOLLOW)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        return (stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_size == shard.size
                and os.pread(fd, len(shard.header), 0) == shard.header)
    except OSError:
        return False
    finally:
        os.close(fd)


def _part_path(path: str) -> str:
    return f"{path}-{socket.gethostname()}-{os.getpid()}"


def record_done(path: str, name: str) -> None:
    """Append one finished tensor to this process's part of the journal at `path` (one small
    O_APPEND write from one process: atomic)."""
    _append(_part_path(path), f"done {name}\n")


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NOFOLLOW, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
