"""Read a tensor job's inputs as row chunks: the chunk source that methods' passes run on.

`inputs(job)` opens every input of a TensorJob and returns a function rows -> (xs, base):
rows [r0, r1) of every input in the job's dtype, on the CPU. Each input is its stored rows
(`Stored`: pread into buffers this thread reuses, or the whole tensor read once when the
job is resident; `.bin` inputs are views of the mmapped checkpoint), cut to its crop, plus
its LoRA delta for those rows (B[r0:r1] @ A), cast; with a vocabulary alignment each input's
rows are then gathered by token (own rows, default rows, padding: plan/vocab.py). Nothing
tensor-sized is allocated unless the job is resident.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from mergeflow.dtypes import CODE_TO_TORCH
from mergeflow.errors import MergeflowError
from mergeflow.exec.jobs import Produced, Source, TensorJob
from mergeflow.plan.vocab import DEFAULT, PAD
from mergeflow.sources.models import TensorInfo, _load_bin, read_safetensors_header


@lru_cache(maxsize=256)
def _header(file: str, mtime_ns: int, size: int) -> dict[str, TensorInfo]:
    return read_safetensors_header(Path(file))


def load_tensor(info_file: str, name: str):
    """One tensor as a torch tensor.

    safetensors: a view of the file through a fresh safetensors mmap, after
    posix_fadvise(WILLNEED) on its byte range: the kernel starts reading it now, while the
    task that will use it is still queued. Nothing is copied; the mapping, and the file pages
    it holds resident, goes away with the tensor (no handle is cached, so a worker's memory is
    what its live tensors map). Measured on the 2 GB benchmark: 20% less CPU than pread into
    fresh buffers. .bin: a view of the mmapped checkpoint.
    """
    if info_file.endswith(".safetensors"):
        return map_tensor(_info(info_file, name))
    state = _load_bin(info_file)
    if name not in state:
        raise MergeflowError(f"{info_file}: has no tensor {name} any more (changed since planning?)")
    return state[name]


def _info(file: str, name: str) -> TensorInfo:
    """A safetensors tensor's header entry as the file is now (re-read if it changed)."""
    try:
        st = os.stat(file)
        info = _header(file, st.st_mtime_ns, st.st_size).get(name)
    except OSError as e:
        raise MergeflowError(f"{file}: cannot read tensor {name}: {e.strerror or e}") from None
    if info is None:
        raise MergeflowError(f"{file}: has no tensor {name} any more (changed since planning?)")
    return info


def map_tensor(info: TensorInfo):
    """A safetensors tensor mapped from its file, read ahead."""
    from safetensors import safe_open

    try:
        if info.end > info.begin and hasattr(os, "posix_fadvise"):
            fd = os.open(info.file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, info.begin, info.end - info.begin, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        return safe_open(info.file, framework="pt").get_tensor(info.name)
    except Exception as e:
        raise MergeflowError(f"{info.file}: cannot read tensor {info.name}: {e}") from None


class Stored:
    """One stored tensor's rows, as stored (dtype and row shape). Use as a context manager."""

    def __init__(self, src: Source, resident: bool):
        self.src, self.fd, self.whole = src, None, None
        self.dtype = getattr(torch, CODE_TO_TORCH[src.dtype])
        self.row_shape = tuple(src.shape[1:])
        if not src.file.endswith(".safetensors"):
            self.whole = load_tensor(src.file, src.tensor).reshape(-1, *self.row_shape)
            return
        info = _info(src.file, src.tensor)
        if info.begin != src.begin or tuple(info.shape) != src.shape or info.dtype != src.dtype:
            raise MergeflowError(f"{src.file}: tensor {src.tensor} changed since planning; plan the merge again")
        try:
            self.fd = os.open(src.file, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self.fd, src.begin, src.nbytes, os.POSIX_FADV_SEQUENTIAL)
        except OSError as e:
            raise MergeflowError(f"{src.file}: cannot read tensor {src.tensor}: {e.strerror or e}") from None
        if resident:
            rows = src.shape[0] if src.shape else 1
            self.whole = self._read(0, rows, torch.empty(src.nbytes, dtype=torch.uint8))

    def __enter__(self) -> Stored:
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def rows(self, r0: int, r1: int, buffer: torch.Tensor | None) -> torch.Tensor:
        """Rows [r0, r1), read into `buffer` (uint8, large enough) unless the tensor is held."""
        if self.whole is not None:
            return self.whole[r0:r1]
        return self._read(r0, r1, buffer)

    def gather(self, index: np.ndarray, buffer: torch.Tensor | None) -> torch.Tensor:
        """The rows at `index` (any order), read run by run of consecutive rows."""
        if self.whole is not None:
            return self.whole[torch.from_numpy(index.astype(np.int64))]
        row = self.src.row_bytes
        out = buffer[: len(index) * row]
        starts = np.flatnonzero(np.diff(index, prepend=index[0] - 2) != 1) if len(index) else []
        ends = list(starts[1:]) + [len(index)]
        for s, e in zip(starts, ends):
            _pread_all(self.fd, out[s * row: e * row].numpy(), self.src.begin + int(index[s]) * row,
                       self.src.file, self.src.tensor)
        return out.view(self.dtype).view(len(index), *self.row_shape)

    def _read(self, r0: int, r1: int, buffer: torch.Tensor) -> torch.Tensor:
        row = self.src.row_bytes
        view = buffer[: (r1 - r0) * row]
        _pread_all(self.fd, view.numpy(), self.src.begin + r0 * row, self.src.file, self.src.tensor)
        return view.view(self.dtype).view(r1 - r0, *self.row_shape)


class Lora:
    """A LoRA adapter's delta to one weight, for any of its rows (float32)."""

    def __init__(self, delta, weight_shape: tuple[int, ...]):
        self.delta = delta
        self.a = load_tensor(delta.file, delta.a).float()
        self.b = load_tensor(delta.file, delta.b).float()
        self.transposed = delta.embedding or delta.transpose
        shape = (self.a.shape[1], self.b.shape[0]) if self.transposed else (self.b.shape[0], self.a.shape[1])
        if tuple(shape) != tuple(weight_shape):
            raise MergeflowError(f"adapter tensor {delta.a}: delta shape {list(shape)} does not match "
                                 f"the weight's {list(weight_shape)}")

    def add(self, weight: torch.Tensor, rows: slice | torch.Tensor) -> torch.Tensor:
        """W[rows] + scale * (B @ A)[rows] (transposed layouts: rows of (B @ A).T), rounded once."""
        d = (self.b @ self.a[:, rows]).T if self.transposed else self.b[rows] @ self.a
        return (weight.float() + self.delta.scale * d).to(weight.dtype)


_local = threading.local()


def _buffers(sizes: list[int], level: int = 0) -> list[torch.Tensor]:
    """This thread's read buffers (uint8) at nesting `level` (an intermediate tensor's inputs
    are read while its consumer's are in use), grown to `sizes` and kept for its next tasks."""
    pools = getattr(_local, "pools", None) or {}
    have = pools.get(level, [])
    have += [torch.empty(0, dtype=torch.uint8) for _ in range(len(sizes) - len(have))]
    for i, size in enumerate(sizes):
        if have[i].numel() < size:
            have[i] = torch.empty(size, dtype=torch.uint8)
    pools[level] = have
    _local.pools = pools
    return have[: len(sizes)]


class Input:
    """One input of a job: stored rows plus its LoRA delta, cut to its crop, in the job's dtype."""

    def __init__(self, src: Source, stored: Stored, buffer: torch.Tensor | None, dtype: torch.dtype):
        self.src, self.stored, self.buffer, self.dtype = src, stored, buffer, dtype
        self.lora = Lora(src.lora, src.shape) if src.lora is not None else None

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        t = self.stored.rows(r0, r1, self.buffer)
        if self.lora is not None:
            t = self.lora.add(t, slice(r0, r1))
        if self.src.crop is not None:
            t = t[(slice(None), *(slice(0, c) for c in self.src.crop[1:]))]
        return t.to(self.dtype)

    def gather(self, index: np.ndarray) -> torch.Tensor:
        t = self.stored.gather(index, self.buffer)
        if self.lora is not None:
            t = self.lora.add(t, torch.from_numpy(index.astype(np.int64)))
        return t.to(self.dtype)


class Computed:
    """An intermediate tensor's rows: its producer job's apply over those rows, run on the
    producer's own inputs with its statistics. Read in order from row 0 (each pass of the
    consumer starts again at 0), or held whole when the consumer is resident."""

    def __init__(self, src: Source, produced: Produced, resident: bool, stack: contextlib.ExitStack, level: int):
        from mergeflow.methods.passes import apply_rows

        self._apply_rows = apply_rows
        self.src, self.job, self.stats = src, src.producer, produced.stats
        self.program = self.job.program()
        self.out = getattr(torch, self.job.out_dtype)
        step = self.job.layout.chunk_rows(self.job.chunk, reduction=False, whole_rows_of_1d=self.program.row_local)
        self.source = stack.enter_context(inputs(self.job, step, produced.inputs, level + 1))
        self.carry: dict = {}
        self.next, self.whole = 0, None
        if resident:
            self.whole = self._compute(0, self.job.layout.rows)

    def _compute(self, r0: int, r1: int) -> torch.Tensor:
        if r0 == 0:
            self.carry = {}
        elif r0 != self.next:
            raise MergeflowError(f"{self.job.label}: an intermediate tensor is read out of order (rows {r0}..{r1} "
                                 f"after {self.next}); this is a bug in mergeflow's multi-stage plan")
        parts: list[torch.Tensor] = []
        self._apply_rows(self.program, self.source, self.job.layout, self.stats, (r0, r1), self.job.chunk,
                         lambda a, b, out: parts.append(out.to(self.out)), self.job.keys, carry=self.carry)
        self.next = r1
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        return out.reshape(r1 - r0, *self.src.shape[1:])

    def __enter__(self) -> Computed:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def rows(self, r0: int, r1: int, buffer: torch.Tensor | None) -> torch.Tensor:
        return self.whole[r0:r1] if self.whole is not None else self._compute(r0, r1)

    def gather(self, index: np.ndarray, buffer: torch.Tensor | None) -> torch.Tensor:
        if self.whole is None:
            raise MergeflowError(f"{self.job.label}: rows of an intermediate tensor gathered by token need it "
                                 "held whole; this is a bug in mergeflow's multi-stage plan")
        return self.whole[torch.from_numpy(index.astype(np.int64))]


@contextlib.contextmanager
def inputs(job: TensorJob, max_rows: int, produced: tuple[Produced | None, ...] = (), level: int = 0):
    """The job's chunk source: rows [r0, r1) (at most `max_rows` rows) -> (xs, base);
    `produced[i]`: the statistics of source i when it is an intermediate tensor."""
    dtype = getattr(torch, job.dtype)
    with contextlib.ExitStack() as stack:
        stored = [Computed(s, produced[i], job.resident, stack, level) if s.producer is not None
                  else stack.enter_context(Stored(s, job.resident)) for i, s in enumerate(job.sources)]
        buffers = iter(_buffers([s.src.row_bytes * max_rows for s in stored
                                 if s.whole is None and isinstance(s, Stored)], level))
        every = [Input(src, s, next(buffers) if s.whole is None and isinstance(s, Stored) else None, dtype)
                 for src, s in zip(job.sources, stored)]
        align = Aligned(job, every, dtype) if job.vocab is not None else None

        def rows(r0: int, r1: int):
            got = align.rows(r0, r1) if align is not None else [i.rows(r0, r1) for i in every]
            return got[: job.xs], (got[job.xs] if job.base else None)

        yield rows


class Aligned:
    """Every input re-indexed to the output vocabulary, a block of rows at a time: own rows
    gathered by token, a token's default row (the mean of its listed source rows, summed in
    float32 in the listed order and rounded once), padding rows the input's mean row (over
    its aligned rows, summed in float64)."""

    def __init__(self, job: TensorJob, every: list[Input], dtype: torch.dtype):
        spec = job.vocab
        self.job, self.every, self.dtype = job, every, dtype
        if spec.sizes and [s.shape[0] for s in job.sources] != list(spec.sizes):
            raise MergeflowError(f"vocabulary alignment of {job.name}: the inputs have "
                                 f"{[s.shape[0] for s in job.sources]} rows, the plan expects {list(spec.sizes)}")
        self.maps = [np.frombuffer(m, dtype=np.int32) for m in spec.maps]
        self.defaults = dict(spec.defaults)
        self.width = tuple(job.sources[0].shape[1:])
        self.pads = [self._pad_row(k) if (m == PAD).any() else None for k, m in enumerate(self.maps)]

    def _default(self, row: int) -> torch.Tensor:
        sources = self.defaults[row]
        if not sources:
            return torch.zeros(self.width, dtype=self.dtype)
        if len(sources) == 1:
            k, j = sources[0]
            return self.every[k].gather(np.array([j]))[0].clone()
        acc = torch.zeros(self.width, dtype=torch.float64 if self.dtype == torch.float64 else torch.float32)
        for k, j in sources:
            acc += self.every[k].gather(np.array([j]))[0]
        return (acc / len(sources)).to(self.dtype)

    def _aligned(self, k: int, r0: int, r1: int, pad: bool = True) -> torch.Tensor:
        index = self.maps[k][r0:r1]
        out = torch.zeros((r1 - r0, *self.width), dtype=self.dtype)
        own = index >= 0
        if own.any():
            out[torch.from_numpy(own)] = self.every[k].gather(index[own])
        for i in np.flatnonzero(index == DEFAULT):
            out[i] = self._default(r0 + int(i))
        if pad and (index == PAD).any():
            out[torch.from_numpy(index == PAD)] = self.pads[k]
        return out

    def _pad_row(self, k: int) -> torch.Tensor:
        """The mean of input k's aligned rows that are not padding (one pass over them)."""
        rows = len(self.maps[k])
        step = max(1, self.job.chunk // max(1, math.prod(self.width)))
        total, count = torch.zeros(self.width, dtype=torch.float64), 0
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            keep = torch.from_numpy(self.maps[k][r0:r1] != PAD)
            total += self._aligned(k, r0, r1, pad=False)[keep].double().sum(0)
            count += int(keep.sum())
        return (total / max(count, 1)).float().to(self.dtype)

    def rows(self, r0: int, r1: int) -> list[torch.Tensor]:
        return [self._aligned(k, r0, r1) for k in range(len(self.every))]


def _pread_all(fd: int, out, offset: int, file: str, name: str) -> None:
    view = memoryview(out).cast("B")
    while len(view):
        try:
            n = os.preadv(fd, [view], offset)
        except OSError as e:
            raise MergeflowError(f"{file}: cannot read tensor {name}: {e.strerror or e}") from None
        if n == 0:
            raise MergeflowError(f"{file}: truncated while merging: tensor {name} ends past the end of "
                                 "the file; re-download this file")
        view, offset = view[n:], offset + n
