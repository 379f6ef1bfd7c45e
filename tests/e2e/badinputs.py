"""Ways to damage a model directory, for the failure tests (tests/e2e/test_failures.py).

Each helper changes files in place (call it on a copy): corrupt or oversized safetensors
headers (offsets, shapes, dtypes, nesting, duplicate names, metadata), truncated or extended
files, tensors removed, reshaped, retyped or poisoned with NaN, broken indexes and configs,
FIFOs and symlink loops in place of files, and `.bin` checkpoints that are not weights-only
(pickles that would run code if unpickled).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

LAYER1_UP = "model.layers.1.mlp.up_proj.weight"


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def weights(model_dir: Path) -> Path:
    """The model's single safetensors file."""
    (file,) = sorted(Path(model_dir).glob("*.safetensors"))
    return file


def split_header(file: Path) -> tuple[dict[str, Any], bytes]:
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_header(file: Path, header: Any, data: bytes) -> None:
    """Write a safetensors file with this (possibly invalid) header and data."""
    body = json.dumps(header).encode() if not isinstance(header, bytes) else header
    file.write_bytes(struct.pack("<Q", len(body)) + body + data)


def edit_header(file: Path, name: str, **changes: Any) -> None:
    """Change (or, with value None, delete) fields of one tensor's header entry."""
    header, data = split_header(file)
    for key, value in changes.items():
        if value is None:
            header[name].pop(key, None)
        else:
            header[name][key] = value
    write_header(file, header, data)


def raw_header(file: Path, text: bytes) -> None:
    """Replace the header with these exact bytes (invalid JSON, duplicate keys, nesting)."""
    write_header(file, text, split_header(file)[1])


def deeply_nested(depth: int = 100_000) -> bytes:
    return b'{"a": ' + b"[" * depth + b"]" * depth + b"}"


def offsets(file: Path) -> dict[str, list[int]]:
    header, _ = split_header(file)
    return {k: v["data_offsets"] for k, v in header.items() if k != "__metadata__"}


def drop_entry(file: Path, name: str) -> None:
    """Remove a tensor from the header only: its bytes then belong to no tensor."""
    header, data = split_header(file)
    del header[name]
    write_header(file, header, data)


def append(file: Path, data: bytes) -> None:
    with open(file, "ab") as f:
        f.write(data)


def set_header_length(file: Path, n: int) -> None:
    with open(file, "r+b") as f:
        f.write(struct.pack("<Q", n))


def truncate(file: Path, keep: int) -> None:
    """Keep the first `keep` bytes (negative: drop the last -keep bytes)."""
    size = file.stat().st_size
    os.truncate(file, keep if keep >= 0 else size + keep)


def change_tensors(model_dir: Path, drop: tuple[str, ...] = (), nan: tuple[str, ...] = (),
                   transpose: tuple[str, ...] = (), to_int: tuple[str, ...] = (),
                   file: Path | None = None, add: dict[str, torch.Tensor] | None = None) -> None:
    """Rewrite the model's weights (or one shard) with tensors dropped, set to NaN,
    transposed, turned into int16 of the same shape, or added."""
    file = file or weights(model_dir)
    state = load_file(file)
    for name in drop:
        del state[name]
    for name in nan:
        state[name] = torch.full_like(state[name], float("nan"))
    for name in transpose:
        state[name] = state[name].t().contiguous()
    for name in to_int:
        state[name] = state[name].view(torch.int16)
    state.update(add or {})
    save_file(state, file, metadata={"format": "pt"})


def edit_json(file: Path, **changes: Any) -> None:
    """Change (or, with value None, delete) top-level keys of a JSON file."""
    data = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    file.write_text(json.dumps(data))


def fifo_in_place_of(file: Path) -> None:
    """Replace a file with a FIFO: opening it for reading blocks until a writer comes."""
    file.unlink()
    os.mkfifo(file)


class RunsCode:
    """Unpickling this runs a shell command (what weights_only=True must refuse)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Custom:
    """A harmless custom class: still not allowed in a weights-only checkpoint."""

    value = 1


def replace_with_bin(model_dir: Path, payload: Any, *, raw_pickle: bool = False) -> Path:
    """Swap the safetensors weights for pytorch_model.bin holding `payload`."""
    weights(model_dir).unlink()
    path = model_dir / "pytorch_model.bin"
    if raw_pickle:
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    return path
