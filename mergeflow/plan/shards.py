"""Output shards: safetensors headers planned up front, tensors written at their offsets.

Shapes and dtypes are known from the input headers, so every shard's header and every
tensor's byte range are fixed before any tensor is read. A shard file is created once at
its full size (`prepare_shard`); each tensor's bytes then go to their own range with
`pwrite` (`write_at`), from any worker that sees the output directory, in any order. No
step truncates a file that other writes may already have filled. The blocks are reserved
up front (fallocate) where the filesystem allows, so a full disk shows before any tensor.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mergeflow.plan import TensorPlan

from mergeflow.dtypes import DTYPE_BYTES as SIZES
from mergeflow.dtypes import TORCH_TO_CODE as CODES


@dataclass(frozen=True)
class ShardPlan:
    file: str  # file name inside the output directory
    header: bytes  # the 8-byte length and the JSON header, padded to a multiple of 8
    size: int  # the whole file
    tensors: tuple[str, ...]


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = SIZES[CODES[dtype]]
    for d in shape:
        n *= d
    return n


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]


def plan_shards(tensors: list[TensorPlan], max_size: int) -> tuple[list[TensorPlan], list[ShardPlan]]:
    """Fill shards in tensor order up to `max_size` bytes; fix every tensor's byte range."""
    groups: list[list[TensorPlan]] = [[]]
    size = 0
    for t in tensors:
        n = tensor_nbytes(t.out_dtype, t.shape)
        if groups[-1] and size + n > max_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += n
    names = shard_names(len(groups))
    placed, shards = [], []
    for k, (file, group) in enumerate(zip(names, groups)):
        entries, offset = {}, 0
        for t in group:
            n = tensor_nbytes(t.out_dtype, t.shape)
            entries[t.name] = {"dtype": CODES[t.out_dtype], "shape": list(t.shape),
                               "data_offsets": [offset, offset + n]}
            offset += n
        header = encode_header(entries)
        for t in group:
            begin, end = entries[t.name]["data_offsets"]
            placed.append(dataclasses.replace(t, shard=k, begin=len(header) + begin, end=len(header) + end))
        shards.append(ShardPlan(file, header, len(header) + offset, tuple(t.name for t in group)))
    return placed, shards


def encode_header(entries: dict) -> bytes:
    body = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    body += b" " * (-(8 + len(body)) % 8)
    return len(body).to_bytes(8, "little") + body


def read_header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))
