"""The functions that graph tasks run: load an input, merge, write at an offset, finalize.

Each takes plain data (paths, names, numbers, small dicts) so a graph pickles to any worker.
`merge` calls the method's kernel and applies the engine-wide rules: dtype casts, the device,
per-(tensor, model) random generators, and the NaN/Inf check.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from mergeflow.errors import MergeflowError
from mergeflow.io.lora import LoraDelta, apply_lora
from mergeflow.io.models import load_tensor
from mergeflow.io.shards import sync_file, write_at
from mergeflow.journal import record_done
from mergeflow.methods import REGISTRY
from mergeflow.vocab import align_rows

CHUNK_ELEMENTS = 1 << 17  # per block in _in_row_chunks: 512 KB float32 temporaries, in the heap (cli.py)


def load(file: str, name: str, crop: tuple[int, ...] | None, dtype: str | None,
         lora: LoraDelta | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """One input tensor, or only its rows [rows[0], rows[1]) (a row block, inside any crop)."""
    if rows is not None and lora is None:
        t = load_tensor(file, name, rows)
        rows, crop = None, (crop and (t.shape[0], *crop[1:]))
    else:
        t = load_tensor(file, name)
    if lora is not None:
        t = apply_lora(t, lora, load_tensor)
    if rows is not None:
        t = t[rows[0]:rows[1]]
        crop = crop and (t.shape[0], *crop[1:])
    if crop is not None:
        t = t[tuple(slice(0, c) for c in crop)]
    if dtype is not None:
        t = t.to(getattr(torch, dtype))
    return t


def load_after(written: int, *args) -> torch.Tensor:
    """`load(*args)`, run only once an earlier tensor is written (memory.py's lanes)."""
    return load(*args)


def generators(seed: int, tensor: str, count: int) -> list[torch.Generator]:
    """One CPU generator per input, seeded from (run seed, tensor name, input index)."""
    out = []
    for i in range(count):
        digest = hashlib.sha256(f"{seed}\0{tensor}\0{i}".encode()).digest()
        out.append(torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1))
    return out


def merge(spec: dict[str, Any], *tensors: torch.Tensor) -> torch.Tensor:
    """Run one tensor's merge. `spec`: name, method, params, inputs (count), base, dtypes..."""
    method = REGISTRY[spec["method"]]
    device = torch.device(spec.get("device") or "cpu")
    tensors = _common_dtype([t.to(device) for t in tensors])
    if spec.get("vocab") is not None:  # re-index rows to the output vocabulary first
        tensors = align_rows(spec["vocab"], tensors)
    n = spec["inputs"]
    xs, base = list(tensors[:n]), (tensors[n] if spec["base"] else None)
    kwargs = {**method.preset, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in spec["params"]}}
    if method.random:
        kwargs["generators"] = generators(spec["seed"], spec["name"], n)
    out_dtype = getattr(torch, spec["out_dtype"])
    try:
        if method.row_separable and device.type == "cpu" and len(tensors) > 1:
            out = _in_row_chunks(method.kernel, xs, base, kwargs, out_dtype)
        else:
            out = method.kernel(xs, base, **kwargs).to(out_dtype)
    except ValueError as e:
        raise MergeflowError(f"merge of {spec['name']}: {e}") from None
    if out.is_floating_point() and not _all_finite(out):
        bad = int((~torch.isfinite(out)).sum())
        raise MergeflowError(f"merge of {spec['name']} ({spec['method']}) produced {bad} NaN/Inf "
                             "values; check the inputs and parameters for this tensor")
    return out.cpu()


def _in_row_chunks(kernel, xs: list[torch.Tensor], base: torch.Tensor | None, kwargs: dict,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """A row-separable kernel run over blocks of about CHUNK_ELEMENTS, written into one
    output: the same bytes as one call (rows are independent), but each op's float32
    temporaries stay in the CPU cache and come from the allocator's free list instead of
    fresh zeroed pages (linear on 11.5M bf16 elements: 40 ms whole, 20 ms in blocks). A
    single input is returned or scaled as a whole: there is nothing to keep in cache."""
    first = base if base is not None else xs[0]
    step = max(1, CHUNK_ELEMENTS // max(1, first[0].numel())) if first.dim() else 1
    rows = first.shape[0] if first.dim() else 1
    if rows <= step:
        return kernel(xs, base, **kwargs).to(out_dtype)
    out = None
    for r0 in range(0, rows, step):
        part = kernel([x[r0:r0 + step] for x in xs], None if base is None else base[r0:r0 + step],
                      **kwargs).to(out_dtype)
        if out is None:
            out = torch.empty((rows, *part.shape[1:]), dtype=part.dtype, device=part.device)
        out[r0:r0 + step] = part
    return out


def _all_finite(t: torch.Tensor) -> bool:
    """NaN and Inf reach the sum, so a finite sum proves every element finite (one fast
    pass; isfinite().all() measured 20-40x slower). Only a non-finite sum, which an overflow
    of finite values can also give, needs the elementwise check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _common_dtype(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    dt = tensors[0].dtype
    for t in tensors[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return [t if t.dtype == dt else t.to(dt) for t in tensors]


def write(path: str, begin: int, nbytes: int, name: str, journal: str, tensor: torch.Tensor) -> int:
    """Put one tensor's bytes at its planned offset, then record it in the journal (a row
    block, with journal "", is recorded by `commit` once all its tensor's blocks are written)."""
    data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    if data.nbytes != nbytes:
        raise MergeflowError(f"write of {name}: {data.nbytes} bytes, but the plan expects {nbytes}")
    try:
        write_at(path, begin, data)
        if journal:
            record_done(journal, name)
    except OSError as e:
        raise MergeflowError(f"write of {name} to {path} failed: {e.strerror or e}") from e
    return nbytes


def commit(journal: str, name: str, *written: int) -> int:
    """Record a tensor written in row blocks as done, after all its blocks."""
    try:
        record_done(journal, name)
    except OSError as e:
        raise MergeflowError(f"recording {name} as done in {journal} failed: {e.strerror or e}") from e
    return sum(written)


def finalize(path: str, size: int, *written: int) -> int:
    """Sync a shard whose tensors are all written, and check its size."""
    try:
        actual = sync_file(path)
    except OSError as e:
        raise MergeflowError(f"{path}: cannot sync the finished shard: {e.strerror or e}") from e
    if actual != size:
        raise MergeflowError(f"{path}: {actual} bytes after writing, expected {size}")
    return sum(written)


def fused(loads: list[tuple], spec: dict[str, Any], target: tuple, *after: int) -> int:
    """Load, merge and write one tensor in one task (process workers, remote clusters);
    `after`: writes this task waits for (memory.py's lanes), unused."""
    return write(*target, merge(spec, *(load(*a) for a in loads)))
