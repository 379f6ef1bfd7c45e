"""The functions that graph tasks run: load an input, merge, write at an offset, finalize,
or stream (all three in row chunks).

Each takes plain data (paths, names, numbers, small dicts) so a graph pickles to any worker.
`merge` calls the method's kernel and applies the engine-wide rules: dtype casts, the device,
per-(tensor, model) random generators, and the NaN/Inf check. `stream` applies the same
rules to one block of rows at a time (memory.streams says which tensors).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
from collections.abc import Callable
from typing import Any

import torch

from mergeflow.errors import MergeflowError
from mergeflow.exec.budget import CHUNK_ELEMENTS, DEVICE_CHUNK_ELEMENTS
from mergeflow.exec.journal import record_done
from mergeflow.exec.read import RowReader, apply_lora, load_tensor
from mergeflow.exec.write import sync_file, write_at
from mergeflow.methods import REGISTRY
from mergeflow.plan.vocab import align_rows
from mergeflow.sources.lora import LoraDelta


def load(file: str, name: str, crop: tuple[int, ...] | None, dtype: str | None,
         lora: LoraDelta | None = None) -> torch.Tensor:
    """One input tensor, cut to `crop` and cast to `dtype`."""
    t = load_tensor(file, name)
    if lora is not None:
        t = apply_lora(t, lora, load_tensor)
    return _prepare(t, crop, dtype)


def _prepare(t: torch.Tensor, crop: tuple[int, ...] | None, dtype: str | None) -> torch.Tensor:
    """Cut to `crop` (rows past the crop already left out in a row chunk), cast to `dtype`."""
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


def merger(spec: dict[str, Any]) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """The merge of `spec` as a function of its input tensors (xs, then the base): the
    method's kernel with its keywords, on the spec's device, in the output dtype."""
    method = REGISTRY[spec["method"]]
    device = torch.device(spec.get("device") or "cpu")
    n = spec["inputs"]
    kwargs = {**method.preset, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in spec["params"]}}
    if method.random:
        kwargs["generators"] = generators(spec["seed"], spec["name"], n)
    out_dtype = getattr(torch, spec["out_dtype"])

    def run(tensors: list[torch.Tensor]) -> torch.Tensor:
        tensors = _common_dtype([t.to(device) for t in tensors])
        if spec.get("vocab") is not None:  # re-index rows to the output vocabulary first
            tensors = align_rows(spec["vocab"], tensors)
        xs, base = list(tensors[:n]), (tensors[n] if spec["base"] else None)
        try:
            return method.kernel(xs, base, **kwargs).to(out_dtype)
        except ValueError as e:
            raise MergeflowError(f"merge of {spec['name']}: {e}") from None

    return run


def merge(spec: dict[str, Any], *tensors: torch.Tensor) -> torch.Tensor:
    """Run one tensor's merge. `spec`: name, method, params, inputs (count), base, dtypes..."""
    out = merger(spec)(list(tensors))
    if bad := _bad_values(out):
        raise _not_finite(spec, bad)
    return out.cpu()


def stream(loads: list[tuple], spec: dict[str, Any], target: tuple, *after: int) -> int:
    """Load, merge and write one tensor block of rows by block of rows (memory.streams): each
    block's rows of every input are read into this thread's reused buffers, merged and written
    at the block's offset, so nothing tensor-sized is ever allocated or mapped and a task holds
    a few chunks whatever the tensor's size. The same bytes as `merge` on the whole tensors:
    the method is row-separable (methods/base.py). `loads` as for `load`, without LoRA;
    `after`: writes this task waits for (memory.py's lanes), unused."""
    path, begin, nbytes, name, journal = target
    run, shape = merger(spec), tuple(spec["shape"])
    rows = shape[0] if shape else 1
    chunk = CHUNK_ELEMENTS if torch.device(spec.get("device") or "cpu").type == "cpu" else DEVICE_CHUNK_ELEMENTS
    step = max(1, chunk // max(1, math.prod(shape[1:])))
    out_row = nbytes // rows if rows else 0
    with contextlib.ExitStack() as stack:
        readers = [stack.enter_context(RowReader(file, tensor)) for file, tensor, *_ in loads]
        buffers = _buffers([r.row_bytes() * min(step, rows) for r in readers])
        bad = 0
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            out = run([_prepare(r.rows(r0, r1, buf), crop and (r1 - r0, *crop[1:]), dtype)
                       for r, buf, (_, _, crop, dtype, *_) in zip(readers, buffers, loads)])
            bad += _bad_values(out)
            _write_part(path, begin + r0 * out_row, out_row * (r1 - r0), name, out.cpu())
    if bad:
        raise _not_finite(spec, bad)
    _record(journal, name, path)
    return nbytes


_local = threading.local()


def _buffers(sizes: list[int]) -> list[torch.Tensor]:
    """This thread's read buffers (uint8), grown to `sizes` and kept for its next tasks."""
    have = getattr(_local, "buffers", [])
    have += [torch.empty(0, dtype=torch.uint8) for _ in range(len(sizes) - len(have))]
    for i, size in enumerate(sizes):
        if have[i].numel() < size:
            have[i] = torch.empty(size, dtype=torch.uint8)
    _local.buffers = have
    return have[: len(sizes)]


def _bad_values(out: torch.Tensor) -> int:
    """How many values are NaN or Inf. NaN and Inf reach the sum, so a finite sum proves
    every element finite (one fast pass; isfinite().all() measured 20-40x slower). Only a
    non-finite sum, which an overflow of finite values can also give, needs the count."""
    if not out.is_floating_point() or bool(torch.isfinite(out.sum())):
        return 0
    return int((~torch.isfinite(out)).sum())


def _not_finite(spec: dict[str, Any], bad: int) -> MergeflowError:
    return MergeflowError(f"merge of {spec['name']} ({spec['method']}) produced {bad} NaN/Inf "
                          "values; check the inputs and parameters for this tensor")


def _common_dtype(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    dt = tensors[0].dtype
    for t in tensors[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return [t if t.dtype == dt else t.to(dt) for t in tensors]


def write(path: str, begin: int, nbytes: int, name: str, journal: str, tensor: torch.Tensor) -> int:
    """Put one tensor's bytes at its planned offset, then record it in the journal."""
    _write_part(path, begin, nbytes, name, tensor)
    _record(journal, name, path)
    return nbytes


def _write_part(path: str, begin: int, nbytes: int, name: str, tensor: torch.Tensor) -> None:
    """Put `tensor`'s bytes (a whole tensor, or a row chunk of one) at `begin`."""
    data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    if data.nbytes != nbytes:
        raise MergeflowError(f"write of {name}: {data.nbytes} bytes, but the plan expects {nbytes}")
    try:
        write_at(path, begin, data)
    except OSError as e:
        raise MergeflowError(f"write of {name} to {path} failed: {e.strerror or e}") from e


def _record(journal: str, name: str, path: str) -> None:
    try:
        record_done(journal, name)
    except OSError as e:
        raise MergeflowError(f"write of {name} to {path} failed: {e.strerror or e}") from e


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
