"""Read and fully validate a safetensors header, before any tensor byte is read.

The format: 8 bytes little-endian header length n, n bytes of JSON, then the data. The JSON
object maps each tensor name to {dtype, shape, data_offsets: [begin, end]} (offsets relative
to the data) and may hold `__metadata__`, a mapping of strings to strings. A header is
accepted only if the safetensors library would load the file and every tensor is where it
says: each entry well-typed (dtype a string mergeflow reads, shape a list of non-negative
integers, offsets two integers), no name given twice, each tensor's bytes equal to
shape x dtype, and the tensors, in offset order, tile the data exactly (no overlap, no gap,
nothing past the end of the file, nothing appended after the last tensor).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

from mergeflow.dtypes import CODE_TO_TORCH
from mergeflow.errors import MergeflowError
from mergeflow.sources.files import open_regular, parse_json, read_exact, unique_keys
from mergeflow.sources.tensors import TensorInfo

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
FIX = "re-download or re-save this file"


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Every tensor of one safetensors file, from its validated header."""
    fd, size = open_regular(file, "weights file")
    try:
        raw = read_exact(fd, 0, 8)
        if len(raw) < 8:
            raise MergeflowError(f"{file}: truncated safetensors file ({size} bytes, no header); {FIX}")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise MergeflowError(f"{file}: corrupt safetensors header (header length {n} bytes, "
                                 f"file {size} bytes); {FIX}")
        body = read_exact(fd, 8, n)
    except OSError as e:
        raise MergeflowError(f"{file}: cannot read it ({e.strerror or e})") from None
    finally:
        os.close(fd)
    if len(body) < n:  # the file shrank while being read
        raise MergeflowError(f"{file}: truncated safetensors file while reading its header; {FIX}")
    header = parse_json(body, f"{file}: corrupt safetensors header", hook=unique_keys)
    _check_metadata(file, header.get("__metadata__"))
    tensors = [_entry(file, name, meta, 8 + n) for name, meta in header.items() if name != "__metadata__"]
    _check_tiling(file, tensors, 8 + n, size)
    return {t.name: t for t in tensors}


def _check_metadata(file: Path, metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        bad = (next((k for k, v in metadata.items() if not isinstance(v, str)), None)
               if isinstance(metadata, dict) else None)
        what = f"its value for {bad!r} is not a string" if bad is not None else "it is not a mapping"
        raise MergeflowError(f"{file}: corrupt safetensors header: `__metadata__` must map strings to "
                             f"strings, but {what}; {FIX}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(file: Path, name: str, meta: Any, base: int) -> TensorInfo:
    """One header entry as a TensorInfo with absolute offsets, every field checked."""
    def bad(why: str) -> MergeflowError:
        return MergeflowError(f"{file}: corrupt safetensors header entry for {name}: {why}; {FIX}")

    if not isinstance(meta, dict):
        raise bad("not a JSON object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in meta:
            raise bad(f"no `{key}`")
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(dtype, str):
        raise bad(f"dtype {dtype!r} is not a string")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise bad(f"data_offsets {offsets!r} is not a list of two integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise bad(f"data_offsets {offsets} is not a byte range [begin, end] of the data")
    if dtype not in CODE_TO_TORCH:
        raise MergeflowError(f"{file}: tensor {name} has dtype {dtype}, which mergeflow cannot "
                             f"read (it reads {', '.join(sorted(CODE_TO_TORCH))})")
    info = TensorInfo(name, str(file), dtype, tuple(shape), base + begin, base + end)
    if end - begin != info.nbytes:
        raise MergeflowError(f"{file}: corrupt header: tensor {name} has {end - begin} bytes for "
                             f"shape {list(shape)} {dtype} ({info.nbytes} bytes); {FIX}")
    return info


def _check_tiling(file: Path, tensors: list[TensorInfo], start: int, size: int) -> None:
    """In offset order the tensors cover [start, size) exactly, each right after the last."""
    past = max(tensors, key=lambda t: t.end, default=None)
    if past is not None and past.end > size:  # first: a file cut short is the common damage
        raise MergeflowError(f"{file}: truncated: tensor {past.name} ends at byte {past.end} but the "
                             f"file has {size} bytes; re-download this file")
    at, prev = start, None
    for t in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if t.begin < at:
            raise MergeflowError(f"{file}: corrupt safetensors header: tensor {t.name} (data bytes "
                                 f"{t.begin - start}-{t.end - start}) overlaps {prev.name} (data bytes "
                                 f"{prev.begin - start}-{prev.end - start}); {FIX}")
        if t.begin > at:
            after = f"after {prev.name}" if prev else "before the first tensor"
            raise MergeflowError(f"{file}: corrupt safetensors header: data bytes {at - start}-"
                                 f"{t.begin - start} ({after}) belong to no tensor; {FIX}")
        at, prev = t.end, t
    if at != size:
        raise MergeflowError(f"{file}: corrupt safetensors file: {size - at} bytes after the last "
                             f"tensor's data (the header describes {at} of its {size} bytes); {FIX}")
