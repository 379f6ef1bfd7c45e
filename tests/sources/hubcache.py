"""Put a model directory into a Hugging Face cache exactly as huggingface_hub lays it out.

`models--org--name/blobs/<hash>` holds each file's bytes once (LFS files such as weights under
their sha256, other files under their git blob sha1), `snapshots/<commit>/<path>` are
relative symlinks into `../../blobs`, and `refs/<branch>` holds the commit hash (no newline).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin")


def blob_name(path: Path, data: bytes) -> str:
    if path.suffix in LFS_SUFFIXES:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def cache_model(cache: Path, repo_id: str, model_dir: Path, commit: str,
                refs: tuple[str, ...] = ("main",)) -> Path:
    """Add `model_dir` to `cache` as revision `commit` of `repo_id`; return the snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for file in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / blob_name(file, data)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(model_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot
