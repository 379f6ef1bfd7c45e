"""Read one input model from headers alone: its config.json and every tensor's header.

A model is a Hugging Face model directory (config.json and safetensors, single or sharded
with an index, or PyTorch `.bin` checkpoints), a directory of weights without config.json,
or a single `.safetensors` / `.bin` file (as mergekit-pytorch takes them; its tensors are
merged by name). Where it is comes from hub.py; headers from safetensors.py and
torch_bin.py. An index and its shards must agree both ways: every listed tensor is in the
shard the index names, and every tensor of a shard is listed there, under that shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from mergeflow.errors import MergeflowError
from mergeflow.sources.files import load_json, stat_path
from mergeflow.sources.hub import WEIGHT_PATTERNS, hub_cache_dir, resolve_model_path
from mergeflow.sources.lora import attach_lora
from mergeflow.sources.safetensors import MAX_HEADER, read_safetensors_header
from mergeflow.sources.tensors import TensorInfo
from mergeflow.sources.torch_bin import _load_bin, read_bin_header
from mergeflow.spec.config import ModelRef

__all__ = ["MAX_HEADER", "WEIGHT_PATTERNS", "ModelInfo", "TensorInfo", "_load_bin", "adapter_ref",
           "hub_cache_dir", "read_bin_header", "read_file_header", "read_model",
           "read_safetensors_header", "read_tensor_index", "resolve_model_path"]
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class ModelInfo:
    """One input model: its reference, directory (or file), config.json and tensor headers."""

    ref: ModelRef
    path: str
    config: dict[str, Any]  # {} when the model has no config.json
    tensors: dict[str, TensorInfo] = field(repr=False)
    config_file: str | None = None  # where `config` came from; None: a bare set of tensors

    @property
    def label(self) -> str:
        return str(self.ref)

    def files(self) -> list[str]:
        files = {t.file for t in self.tensors.values()}
        return sorted(files | {t.lora.file for t in self.tensors.values() if t.lora})


def adapter_ref(ref: ModelRef) -> ModelRef | None:
    """The `+adapter` of a reference as a reference of its own (`+org/lora@rev`: that revision)."""
    return None if ref.lora is None else ModelRef(ref.lora, ref.lora_revision)


def read_model(ref: ModelRef, *, allow_download: bool = True) -> ModelInfo:
    path = resolve_model_path(ref, allow_download=allow_download)
    config, config_file = ({}, None)
    if path.is_dir():
        config, config_file = _read_config(path)
        tensors = read_tensor_index(path, str(ref), "" if config_file else
                                    " and no config.json, so it is not a Hugging Face model directory")
    else:
        tensors = read_file_header(path)
    adapter = adapter_ref(ref)
    if adapter is not None:
        adapter_dir = resolve_model_path(adapter, allow_download=allow_download, what="adapter")
        tensors = attach_lora(tensors, adapter_dir, str(adapter), read_tensor_index)
    return ModelInfo(ref, str(path), config, tensors, config_file)


def _read_config(directory: Path) -> tuple[dict[str, Any], str | None]:
    """config.json (checked where mergeflow reads it), or ({}, None) if there is none."""
    path = directory / "config.json"
    if stat_path(path, "model config") is None:
        return {}, None
    config = load_json(path, "model config")
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise MergeflowError(f"{path}: `architectures` is {archs!r}; it must be a list of class names "
                             "like [\"LlamaForCausalLM\"]")
    if not isinstance(config.get("model_type", ""), str):
        raise MergeflowError(f"{path}: `model_type` is {config['model_type']!r}; it must be a string "
                             "like \"llama\"")
    return config, str(path)


def read_tensor_index(directory: Path, label: str, none_hint: str = "") -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint in `directory`, from headers alone."""
    for index_name in INDEXES:
        index = directory / index_name
        if stat_path(index, "index") is not None:
            return _read_sharded(directory, index, label)
    files = _weight_files(directory)
    if not files:
        raise MergeflowError(f"model {label}: {directory} holds no *.safetensors or pytorch_model*.bin "
                             f"weights{none_hint}")
    out: dict[str, TensorInfo] = {}
    for file in files:
        _add(out, read_file_header(file), file, label)
    return out


def _weight_files(directory: Path) -> list[Path]:
    """model.safetensors where there is one (as transformers loads it), else every
    *.safetensors, else pytorch_model*.bin."""
    if stat_path(directory / "model.safetensors", "weights file") is not None:
        return [directory / "model.safetensors"]
    return sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))


def _add(out: dict[str, TensorInfo], tensors: dict[str, TensorInfo], file: Path, label: str) -> None:
    for name in tensors:
        if name in out:
            raise MergeflowError(f"model {label}: tensor {name} is in both {Path(out[name].file).name} "
                                 f"and {file.name}; a tensor must be stored once. Remove the stale file")
    out.update(tensors)


def _read_sharded(directory: Path, index: Path, label: str) -> dict[str, TensorInfo]:
    weight_map = load_json(index, "index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise MergeflowError(f"model {label}: {index} is not a valid index: its `weight_map` must map "
                             "every tensor name to the shard file holding it")
    shards: dict[str, dict[str, TensorInfo]] = {}
    for file in sorted(set(weight_map.values())):
        parts = PurePosixPath(file).parts
        if not parts or PurePosixPath(file).is_absolute() or ".." in parts or "\\" in file:
            raise MergeflowError(f"model {label}: {index} points outside the model directory ({file})")
        shard = directory / file  # not resolved: a Hub snapshot's shards are links into blobs/
        if stat_path(shard, "shard") is None:
            raise MergeflowError(f"model {label}: {index} lists {file}, which is missing")
        shards[file] = read_file_header(shard)
    out: dict[str, TensorInfo] = {}
    for file, tensors in shards.items():
        _add(out, tensors, directory / file, label)
    for file, tensors in shards.items():
        stray = next((n for n in tensors if weight_map.get(n) != file), None)
        if stray is not None:
            listed = f"lists it under {weight_map[stray]}" if stray in weight_map else "does not list it"
            raise MergeflowError(f"model {label}: {file} holds tensor {stray}, but {index.name} {listed}; "
                                 "the index and its shards disagree. Re-download the model")
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise MergeflowError(f"model {label}: {index} lists {missing[0]} in {weight_map[missing[0]]}, "
                             "but no shard holds it")
    return out


def read_file_header(file: Path) -> dict[str, TensorInfo]:
    try:
        if file.suffix == ".safetensors":
            return read_safetensors_header(file)
        return read_bin_header(file)
    except OSError as e:  # unreadable, a directory, a dangling link
        raise MergeflowError(f"{file}: cannot read it ({e.strerror or e})") from None
