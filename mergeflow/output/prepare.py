"""The output directory before the merge: what it holds, the lock, and the first writes.

- `check_output` (reads only): refuse an OUT that is an input through any path (compared by
  device and inode, so a bind mount or a symlink of an input is caught): a model, its LoRA
  adapter, the tokenizer source, a `tokens:` source; an OUT inside one, or holding one; an
  OUT that is not a directory; a non-empty OUT without force or resume; resume into a
  non-empty OUT that holds no journal, unless force. It also says when OUT already holds
  this very merge, finished (then there is nothing to do).
- `lock_output`: an exclusive lock (flock) on OUT for the whole run; a second run on the
  same OUT is refused while the first holds it.
- `prepare_output` (after every check, the scheduler's included): from here until config.json
  is written last, OUT does not look complete: config.json and the index go, stale shards
  and links in place of the state directory go, the journal restarts with what is on disk,
  and each shard is created anew (or kept, on resume).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from mergeflow.errors import MergeflowError
from mergeflow.exec.journal import (
    STATE_DIR,
    PlanChanged,
    has_journal,
    on_disk,
    read_journal,
    start_journal,
)
from mergeflow.exec.options import RunOptions
from mergeflow.exec.write import prepare_shard
from mergeflow.output.inputs import input_dirs
from mergeflow.output.metadata import COMPLETE_MARKERS, is_finished
from mergeflow.plan import MergePlan
from mergeflow.spec.sizes import human_bytes


@dataclass(frozen=True)
class OutputState:
    """What OUT holds for this plan: already finished, or the tensors done (resume)."""

    finished: bool = False
    done: frozenset[str] = field(default_factory=frozenset)
    rebooted: bool = False  # the journal is from before a reboot, so nothing counts as done


def check_output(plan: MergePlan, out_dir: Path, options: RunOptions) -> OutputState:
    """Refuse an output directory this merge must not write; see the module docstring. A
    `resume` into an OUT that already holds this merge, finished, is `finished`."""
    if options.resume and check_directory(plan, out_dir, options, journal=False) and is_finished(plan, out_dir):
        return OutputState(finished=True)
    return output_state(plan, out_dir, options)


def output_state(plan, out_dir: Path, options: RunOptions) -> OutputState:
    """For any plan with shards and a fingerprint (a merge, a MoE): the checks of
    `check_directory`, then on `resume` the tensors already written (the journal, as on disk)."""
    if not check_directory(plan, out_dir, options) or not options.resume:
        return OutputState()
    return _resumable(plan, out_dir, options)


def check_directory(plan, out_dir: Path, options: RunOptions, journal: bool = True) -> bool:
    """The checks of any output directory, whatever it receives (a merge, an adapter): no
    overlap with an input, a directory, and when not empty `force`, or `resume` with a journal
    (`journal=False`: that one left to the caller). Returns whether OUT holds anything."""
    _check_overlap(plan, out_dir)
    if os.path.lexists(out_dir) and not out_dir.is_dir():
        raise MergeflowError(f"output {out_dir} exists and is not a directory; choose a directory path")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return False
    if options.resume:
        if journal and not has_journal(out_dir) and not options.force:
            raise MergeflowError(
                f"output directory {out_dir} holds no journal of an interrupted run, so there is "
                f"nothing to resume (it holds files of another run or of something else); "
                f"{options.term('force')} replaces its files, or choose an empty directory")
        return True
    if not options.force:
        raise MergeflowError(f"output directory {out_dir} is not empty; {options.term('force')} "
                             f"overwrites it, {options.term('resume')} continues an interrupted run")
    return True


def _resumable(plan: MergePlan, out_dir: Path, options: RunOptions) -> OutputState:
    try:
        done, rebooted = read_journal(out_dir, plan.fingerprint)
    except PlanChanged as e:
        raise MergeflowError(f"{e}; start over with {options.term('force')} and without "
                             f"{options.term('resume')}") from None
    return OutputState(done=frozenset(on_disk(out_dir, plan.shards, done)), rebooted=rebooted)


def _check_overlap(plan: MergePlan, out_dir: Path) -> None:
    """OUT is no input directory, inside none and holds none, by device and inode."""
    out_ids = _ids(out_dir)  # OUT's (if it exists) and each existing parent's
    here = out_ids[0] if out_dir.exists() else None
    for what, directory in input_dirs(plan):
        ids = _ids(directory)
        if not ids:
            continue
        if ids[0] == here:
            how = "it is that directory" + ("" if os.path.realpath(out_dir) == str(directory)
                                            else " under another path (a link or a bind mount)")
        elif ids[0] in out_ids:
            how = "it lies inside it"
        elif here is not None and here in ids[1:]:
            how = "it holds it"
        else:
            continue
        raise MergeflowError(f"output directory {out_dir} overlaps {what} ({directory}): {how}, so "
                             "writing the output would change that input. Choose an output "
                             "directory outside every input")


def _ids(path: Path) -> list[tuple[int, int]]:
    """(device, inode) of `path` (when it exists) and of each of its existing parents."""
    out = []
    for p in [path, *path.parents]:
        try:
            st = os.stat(p)
        except OSError:
            continue
        out.append((st.st_dev, st.st_ino))
    return out


@contextlib.contextmanager
def lock_output(out_dir: Path):
    """Hold an exclusive lock on OUT (made if missing) while inside; refuse when another
    run holds it. An OUT made here and left empty is removed again on the way out."""
    made = not os.path.lexists(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise MergeflowError(f"cannot create the output directory {out_dir}: {e.strerror or e}; "
                             "choose another output path") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise MergeflowError(f"output directory {out_dir} is in use: another mergeflow run is "
                                     "writing into it. Wait for it to finish, or choose another "
                                     "output directory") from None
            warnings.warn(f"cannot lock {out_dir} ({e.strerror or e}; a network filesystem?): make "
                          "sure no other run writes into it at the same time", stacklevel=3)
        try:
            yield
        finally:
            if made:
                with contextlib.suppress(OSError):
                    out_dir.rmdir()  # only if nothing was written
    finally:
        os.close(fd)


def prepare_output(plan: MergePlan, out_dir: Path, state: OutputState) -> int:
    """The first writes into OUT (see the module docstring); returns the header bytes written."""
    for name in COMPLETE_MARKERS:  # from now until the end, the output does not look complete
        (out_dir / name).unlink(missing_ok=True)
    planned = {s.file for s in plan.shards}
    for stale in out_dir.glob("model*.safetensors"):
        if stale.name not in planned:
            stale.unlink()
    state_dir = out_dir / STATE_DIR
    if os.path.lexists(state_dir) and not stat.S_ISDIR(os.lstat(state_dir).st_mode):
        state_dir.unlink()  # a link (or a file) in its place: replaced, never followed
    start_journal(out_dir, plan.fingerprint, state.done)
    return _prepare_shards(plan, out_dir, keep=bool(state.done))


def _prepare_shards(plan: MergePlan, out_dir: Path, keep: bool) -> int:
    """Create every shard with its header and its blocks reserved (on resume, keep those
    still intact)."""
    written = 0
    for shard in plan.shards:
        try:
            if not prepare_shard(out_dir / shard.file, shard, keep=keep):
                written += len(shard.header)
        except OSError as e:
            free = shutil.disk_usage(out_dir).free
            raise MergeflowError(
                f"cannot create {out_dir / shard.file} ({human_bytes(shard.size)}): {e.strerror or e}; "
                f"the merge writes {human_bytes(plan.bytes_written)} and {human_bytes(free)} is free "
                f"there. No tensor was read; free space or choose another output directory") from None
    return written
