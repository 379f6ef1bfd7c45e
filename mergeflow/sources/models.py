"""Find input models and read their tensor headers; load single tensors on demand.

A model reference (config.ModelRef) is a local directory or a Hugging Face Hub id with an
optional @revision, resolved through huggingface_hub (its cache first, so offline works).
Only headers are read here: names, dtypes, shapes and byte offsets from safetensors files
(single or sharded with an index), and names/dtypes/shapes from PyTorch `.bin` checkpoints
through `torch.load(weights_only=True, mmap=True)`. Nothing else is ever unpickled.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from mergeflow.dtypes import CODE_TO_TORCH, DTYPE_BYTES, TORCH_TO_CODE
from mergeflow.errors import MergeflowError
from mergeflow.sources.lora import LoraDelta, attach_lora
from mergeflow.spec.config import ModelRef

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json",
                   "*.json", "*.model", "*.txt", "*.jinja", "tokenizer*"]


@dataclass(frozen=True)
class TensorInfo:
    """Where one input tensor's bytes are: file, dtype code (safetensors), shape, offsets."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int = 0  # absolute byte offsets in `file` (safetensors only)
    end: int = 0
    lora: LoraDelta | None = None  # a LoRA adapter's change to this weight, applied on load

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES.get(self.dtype, 4)
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ModelInfo:
    """One input model: its reference, directory, config.json and tensor headers."""

    ref: ModelRef
    path: str
    config: dict[str, Any]
    tensors: dict[str, TensorInfo] = field(repr=False)

    @property
    def label(self) -> str:
        return str(self.ref)

    def files(self) -> list[str]:
        files = {t.file for t in self.tensors.values()}
        return sorted(files | {t.lora.file for t in self.tensors.values() if t.lora})


def resolve_model_dir(ref: ModelRef | str, *, allow_download: bool = True) -> Path:
    """The local directory of a model: the path itself, or the Hub snapshot (cache first)."""
    path, revision = (ref.path, ref.revision) if isinstance(ref, ModelRef) else (ref, None)
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise MergeflowError(f"model {path}: {local} is a file; a model is a directory "
                                 "holding config.json and *.safetensors (or a Hub id like org/name)")
        return local.resolve()
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise MergeflowError(f"model {path}: no such directory ({local.resolve()}), and it is not "
                             "a Hugging Face id of the form `org/name`; check the path in the config")
    return _hub_snapshot(path, revision, allow_download)


def hub_cache_dir() -> str | None:
    """The Hub cache, read from the environment now (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _hub_snapshot(repo_id: str, revision: str | None, allow_download: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=WEIGHT_PATTERNS,
                                      local_files_only=True, cache_dir=cache))
    except (LocalEntryNotFoundError, FileNotFoundError, HFValidationError, OSError):
        if not allow_download or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
            raise MergeflowError(
                f"model {repo_id}{'@' + revision if revision else ''}: not a local directory and "
                "not in the Hugging Face cache (offline); download it first with "
                f"`huggingface-cli download {repo_id}` or give a local path") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=WEIGHT_PATTERNS,
                                      cache_dir=cache))
    except Exception as e:  # network, auth, missing repo: all user-fixable
        raise MergeflowError(f"model {repo_id}: cannot fetch it from the Hugging Face Hub: "
                             f"{type(e).__name__}: {e}") from None


def read_model(ref: ModelRef, *, allow_download: bool = True) -> ModelInfo:
    directory = resolve_model_dir(ref, allow_download=allow_download)
    config_path = directory / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise MergeflowError(f"model {ref}: {directory} has no config.json, so it is not a "
                             "Hugging Face model directory") from None
    except (OSError, ValueError) as e:
        raise MergeflowError(f"model {ref}: cannot read {config_path}: {e}") from None
    tensors = read_tensor_index(directory, str(ref))
    if ref.lora:
        adapter = resolve_model_dir(ModelRef(ref.lora, ref.lora_revision), allow_download=allow_download)
        tensors = attach_lora(tensors, adapter, ref.lora)
    return ModelInfo(ref, str(directory), config, tensors)


def read_tensor_index(directory: Path, label: str) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint in `directory`, from headers alone."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.exists():
            return _read_sharded(directory, index, label)
    single = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not single:
        raise MergeflowError(f"model {label}: {directory} holds no *.safetensors or pytorch_model*.bin "
                             "weights")
    out: dict[str, TensorInfo] = {}
    for file in single:
        out.update(read_file_header(file))
    return out


def _read_sharded(directory: Path, index: Path, label: str) -> dict[str, TensorInfo]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MergeflowError(f"model {label}: {index} is not a valid index ({e})") from None
    out: dict[str, TensorInfo] = {}
    for file in sorted(set(weight_map.values())):
        shard = (directory / file).resolve()
        if directory.resolve() not in shard.parents:
            raise MergeflowError(f"model {label}: {index} points outside the model directory ({file})")
        if not shard.exists():
            raise MergeflowError(f"model {label}: {index} lists {file}, which is missing")
        out.update(read_file_header(shard))
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise MergeflowError(f"model {label}: {index} lists {missing[0]} but no shard holds it")
    return out


def read_file_header(file: Path) -> dict[str, TensorInfo]:
    try:
        if file.suffix == ".safetensors":
            return read_safetensors_header(file)
        return read_bin_header(file)
    except OSError as e:  # unreadable, a directory, a dangling link
        raise MergeflowError(f"{file}: cannot read it ({e.strerror or e})") from None


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check that every tensor lies inside the file."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise MergeflowError(f"{file}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise MergeflowError(f"{file}: corrupt safetensors header (header length {n} bytes, "
                                 f"file {size} bytes); re-download or re-save this file")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise MergeflowError(f"{file}: corrupt safetensors header (not JSON: {e})") from None
    if not isinstance(header, dict):
        raise MergeflowError(f"{file}: corrupt safetensors header (not a JSON object)")
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = meta["data_offsets"]
            info = TensorInfo(name, str(file), meta["dtype"], tuple(meta["shape"]), base + begin, base + end)
        except (KeyError, TypeError, ValueError):
            raise MergeflowError(f"{file}: corrupt safetensors header entry for {name}") from None
        if info.dtype not in CODE_TO_TORCH:
            raise MergeflowError(f"{file}: tensor {name} has dtype {info.dtype}, which mergeflow cannot "
                                 f"read (it reads {', '.join(sorted(CODE_TO_TORCH))})")
        if info.end > size:
            raise MergeflowError(f"{file}: truncated: tensor {name} ends at byte {info.end} but the "
                                 f"file has {size} bytes; re-download this file")
        if info.end - info.begin != info.nbytes:
            raise MergeflowError(f"{file}: corrupt header: tensor {name} has {info.end - info.begin} "
                                 f"bytes for shape {list(info.shape)} {info.dtype}")
        out[name] = info
    return out


def read_bin_header(file: Path) -> dict[str, TensorInfo]:
    state = _load_bin(str(file))
    out = {}
    for name, t in state.items():
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in TORCH_TO_CODE:
            raise MergeflowError(f"{file}: tensor {name} has dtype {dtype}, which mergeflow cannot read "
                                 f"(it reads {', '.join(sorted(TORCH_TO_CODE))})")
        out[name] = TensorInfo(name, str(file), TORCH_TO_CODE[dtype], tuple(t.shape))
    return out


@lru_cache(maxsize=8)
def _load_bin(file: str) -> dict:
    import pickle

    import torch

    try:  # legacy (pre-zip) checkpoints cannot be mmapped; weights_only reads them all the same
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        raise MergeflowError(f"{file}: not a weights-only PyTorch checkpoint, refused ({_reason(e)}); "
                             "mergeflow never unpickles arbitrary code: convert it to safetensors") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MergeflowError(f"{file}: not a state dict of tensors")
    return state


def _reason(e: Exception) -> str:
    """The telling line of torch.load's long message (the refused global), without its advice
    to load with weights_only=False."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", x).strip() for x in str(e).splitlines() if x.strip()]
    telling = [x for x in lines if "GLOBAL" in x or "Unsupported" in x] or lines or [type(e).__name__]
    return telling[0].removeprefix("WeightsUnpickler error: ").split(". Please use")[0].rstrip(".")

