"""Where a model reference is on disk: a local directory or file, or a Hugging Face snapshot.

A reference is a local path (a model directory, or a single `.safetensors` / `.bin` file as
mergekit-pytorch takes them) or a Hub id `org/name` with an optional `@revision`. Hub ids
are resolved by huggingface_hub itself: `snapshot_download(local_files_only=True)` finds the
snapshot in the cache (`HF_HUB_CACHE`, `HF_HOME`), a branch or tag through `refs/`, a
commit by its hash. A snapshot's files are symlinks into the cache's `blobs/`, as
huggingface_hub lays them out. Only without `HF_HUB_OFFLINE` is the Hub asked.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from mergeflow.errors import MergeflowError
from mergeflow.sources.files import stat_path
from mergeflow.spec.config import ModelRef

WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json",
                   "*.json", "*.model", "*.txt", "*.jinja", "tokenizer*"]
FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")  # a model given as one weights file
_TRUE = {"1", "ON", "YES", "TRUE"}  # how huggingface_hub reads a boolean environment variable


def resolve_model_path(ref: ModelRef | str, *, allow_download: bool = True, what: str = "model") -> Path:
    """The model's directory (or single weights file): the path itself, or the Hub snapshot."""
    ref = ref if isinstance(ref, ModelRef) else ModelRef(ref)
    local = Path(ref.path).expanduser()
    st = stat_path(local, what)
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            return local.resolve()
        if stat.S_ISREG(st.st_mode) and local.suffix in FILE_SUFFIXES:
            return local.absolute()  # not resolved: a Hub snapshot's file links to a blob without a suffix
        kind = "a file" if stat.S_ISREG(st.st_mode) else "not a file or directory"
        raise MergeflowError(f"{what} {ref.path}: {local} is {kind}; a model is a directory holding "
                             "config.json and *.safetensors, a single .safetensors file, or a Hub id "
                             "like org/name")
    if ref.path.startswith((".", "/", "~")) or ref.path.count("/") != 1:
        raise MergeflowError(f"{what} {ref.path}: no such directory ({local.resolve()}), and it is not "
                             "a Hugging Face id of the form `org/name`; check the path in the config")
    return hub_snapshot(ref.path, ref.revision, allow_download, what)


def hub_cache_dir() -> str | None:
    """The Hub cache, read from the environment now (huggingface_hub reads it at import)."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(key):
            return os.environ[key]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def download_command(repo_id: str, revision: str | None) -> str:
    """The command that downloads a repo with the installed huggingface_hub's own CLI."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        scripts = {e.name for e in distribution("huggingface_hub").entry_points if e.group == "console_scripts"}
    except PackageNotFoundError:
        scripts = set()
    cli = "hf" if "hf" in scripts else "huggingface-cli"
    return f"{cli} download {repo_id}" + (f" --revision {revision}" if revision else "")


def hub_snapshot(repo_id: str, revision: str | None, allow_download: bool, what: str = "model") -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
    )

    cache, label = hub_cache_dir(), repo_id + (f"@{revision}" if revision else "")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=WEIGHT_PATTERNS,
                                      local_files_only=True, cache_dir=cache))
    except HFValidationError as e:
        raise MergeflowError(f"{what} {label}: no such directory, and not a valid Hugging Face id "
                             f"({e}); check the path in the config") from None
    except IncompleteSnapshotError as e:
        missing = str(e).split(" is incomplete: ", 1)[-1].split(". ", 1)[0]
        if not allow_download or offline():
            raise MergeflowError(f"{what} {label}: the Hugging Face cache holds an incomplete snapshot "
                                 f"({missing}); finish it with `{download_command(repo_id, revision)}`") from None
    except (LocalEntryNotFoundError, OSError):
        if not allow_download or offline():
            raise MergeflowError(f"{what} {label}: not a local directory and not in the Hugging Face cache "
                                 f"{cache or '(the default)'} (offline){_cached_revisions(repo_id, cache)}; "
                                 f"download it first with `{download_command(repo_id, revision)}` or give "
                                 "a local path") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=WEIGHT_PATTERNS,
                                      cache_dir=cache))
    except Exception as e:  # noqa: BLE001 (network, auth, missing repo: all user-fixable)
        raise MergeflowError(f"{what} {label}: cannot fetch it from the Hugging Face Hub: "
                             f"{type(e).__name__}: {e}") from None


def _cached_revisions(repo_id: str, cache: str | None) -> str:
    """`; the cache has it at ...` when other revisions of the repo are cached (a wrong @revision)."""
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(cache)
    except Exception:  # noqa: BLE001 (no cache, unreadable cache: nothing to add)
        return ""
    revisions = sorted(f"{r.commit_hash}" + (f" ({', '.join(sorted(r.refs))})" if r.refs else "")
                       for repo in info.repos if repo.repo_id == repo_id and repo.repo_type == "model"
                       for r in repo.revisions)
    return f"; the cache has it at {', '.join(revisions)}" if revisions else ""
