"""The resume journal: which tensors of which plan are already on disk.

`OUT/.mergeflow/journal` starts with the plan's fingerprint; each finished tensor appends
one line (`done <name>`) after its bytes are written. `--resume` skips those tensors; a
journal of another plan (changed config or inputs) is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

from mergeflow.errors import MergeflowError

STATE_DIR = ".mergeflow"


def journal_path(out_dir: Path | str) -> Path:
    return Path(out_dir) / STATE_DIR / "journal"


def open_journal(out_dir: Path, fingerprint: str, resume: bool) -> set[str]:
    """Start a fresh journal, or (resume) read the finished tensors of the same plan."""
    path = journal_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    if resume and path.exists():
        lines = path.read_text().splitlines()
        head = lines[0].split() if lines else []
        if head[:1] != ["plan"] or head[1:2] != [fingerprint]:
            raise MergeflowError(
                f"{out_dir}: cannot resume: the output was started from a different config or "
                "different input files (plan fingerprint changed); rerun without --resume and "
                "with --force to start over")
        return {line[5:] for line in lines[1:] if line.startswith("done ")}
    path.write_text(f"plan {fingerprint}\n")
    return set()


def record_done(path: str, name: str) -> None:
    """Append one finished tensor; one small O_APPEND write is atomic on local disks."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, f"done {name}\n".encode())
    finally:
        os.close(fd)
