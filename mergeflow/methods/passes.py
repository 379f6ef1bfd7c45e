"""Methods as chunked passes: the vocabulary every method is written in, and its driver.

A method compiles, for one output tensor, into a Program: zero or more reduction Passes, then
one apply. Everything runs over *chunks*: rows [r0, r1) of every input (dim 0; a 0-d tensor
is one row), already in the compute dtype.
- A Pass maps a chunk (and the statistics of earlier passes) to a *partial*: a dict of
  statistics whose `+` is exact and associative (Hist, Sums, Norms, int counts), so partials
  combine to the same value in any grouping. `finish` turns the combined partials of each
  row block (a list, in block order; one block unless the engine split the tensor) into new
  entries of the statistics dict.
- `apply` maps a chunk and the statistics to the output rows; it may keep state across the
  chunks of one block in `chunk.carry` (the index rule of top-k needs a running count).

Float sums are taken per fixed *segment* of the flat tensor (SEGMENT elements of whole rows,
or SEGMENT-element pieces of rows longer than that), each summed by torch on one thread (in
float64 when there are several segments), and the segment values are then added exactly
(math.fsum). So a tensor of up to SEGMENT elements gets exactly torch's whole-tensor number, a
larger one its sum correctly rounded but for float64's own error, and every tensor the same
number at any chunking, worker count or torch thread count. Reductions run on the CPU; only `apply` runs on
the merge device.

`run_program` drives a program over any chunk source (in-memory tensors here, file reads in
exec/); `run_whole` merges whole in-memory tensors: what a method's kernel function calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

SEGMENT = 32768  # torch reduces up to its grain size (32768 elements) on one thread


@dataclass(frozen=True)
class Layout:
    """How a tensor of `shape` is cut: `rows` rows of `row` elements; float sums per segment of
    `seg_rows` rows (rows longer than SEGMENT: per SEGMENT-element piece of a row)."""

    shape: tuple[int, ...]

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1

    @property
    def numel(self) -> int:
        return self.rows * self.row

    @property
    def seg_rows(self) -> int:
        return max(1, SEGMENT // self.row) if self.row else max(1, self.rows)

    def chunk_rows(self, elements: int, *, reduction: bool, whole_rows_of_1d: bool = False) -> int:
        """Rows per chunk for about `elements` elements: at least one row; for reductions a
        whole number of segments; the whole tensor where a 1-D tensor is one vector."""
        if whole_rows_of_1d and len(self.shape) <= 1:
            return max(1, self.rows)
        rows = max(1, elements // max(1, self.row))
        if reduction:
            g = self.seg_rows
            rows = max(g, rows // g * g)
        return min(rows, max(1, self.rows))


# ----------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Sums:
    """Per-segment float sums; `+` collects them, `value` adds them exactly."""

    parts: tuple[float, ...] = ()

    def __add__(self, other: Sums) -> Sums:
        return Sums(self.parts + other.parts)

    def value(self) -> float:
        return math.fsum(self.parts)


@dataclass(frozen=True)
class Norms:
    """Per-segment 2-norms; `value` is the 2-norm of the whole (exact sum of the squares)."""

    parts: tuple[float, ...] = ()

    def __add__(self, other: Norms) -> Norms:
        return Norms(self.parts + other.parts)

    def value(self) -> float:
        return math.sqrt(math.fsum(p * p for p in self.parts))


@dataclass(frozen=True)
class Hist:
    """Counts per bin (int64); `+` adds them."""

    counts: torch.Tensor

    def __add__(self, other: Hist) -> Hist:
        return Hist(self.counts + other.counts)


@dataclass(frozen=True)
class Columns:
    """Per-column sums (float64) over the rows seen: the statistics of vectors along dim 0.
    Added in float64, so chunkings agree to ~1e-16 relative (not bit for bit): only for
    nuslerp's row-wise vectors and padded vocabulary rows."""

    sums: torch.Tensor

    def __add__(self, other: Columns) -> Columns:
        return Columns(self.sums + other.sums)


def combine(a: dict | None, b: dict) -> dict:
    """Two partials as one: every statistic added (a key on one side only is kept)."""
    if a is None:
        return dict(b)
    out = dict(a)
    for k, v in b.items():
        out[k] = out[k] + v if k in out else v
    return out


def as_tensor(value: float, dtype: torch.dtype) -> torch.Tensor:
    """A statistic as a 0-d tensor of `dtype`, rounded as torch rounds a reduction's result:
    to float32 first (the accumulator of every float dtype but float64), then to `dtype`."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.tensor(value, dtype=acc).to(dtype)


# ----------------------------------------------------------------------------- chunks


@dataclass
class Chunk:
    """Rows [r0, r1) of every input of one output tensor: `xs` (config order) and `base`."""

    xs: list[torch.Tensor]
    base: torch.Tensor | None
    r0: int
    r1: int
    layout: Layout
    keys: tuple[int, ...] = ()  # per x: the key of its counter-based random stream
    block: int = 0  # which row block of the tensor (exec may split a tensor into blocks)
    carry: dict = field(default_factory=dict)  # apply's state across this block's chunks
    memo: dict | None = None  # results kept for these rows from pass to pass (None: not kept)

    @property
    def offset(self) -> int:
        """Flat index of the chunk's first element in the whole tensor."""
        return self.r0 * self.layout.row

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.r1 - self.r0, *self.layout.shape[1:]) if self.layout.shape else ()

    def segments(self, t: torch.Tensor) -> list[torch.Tensor]:
        """The chunk-shaped tensor `t` as 2-D views, one row per segment (see Layout)."""
        flat = t.reshape(-1)
        row, g = self.layout.row, self.layout.seg_rows
        if row > SEGMENT:  # long rows: SEGMENT-element pieces of each row
            rows = flat.view(-1, row)
            full = row // SEGMENT * SEGMENT
            out = [rows[:, :full].reshape(-1, SEGMENT)] if full else []
            return out + ([rows[:, full:]] if full < row else [])
        size = g * row
        full = flat.numel() // size * size if size else 0
        out = [flat[:full].view(-1, size)] if full else []
        return out + ([flat[full:].view(1, -1)] if full < flat.numel() else [])

    def _acc(self, t: torch.Tensor) -> torch.dtype:
        """The segments' accumulator: a tensor of one segment sums as torch sums a whole tensor
        (float32, float64 for float64), so its numbers are torch's; a tensor of several sums
        each segment in float64, so the whole is accurate to the last bit of float32 (torch's
        float32 sums of a million elements are off by up to 5e-5, benchmarks/accuracy_slerp.py)."""
        one = self.layout.numel <= SEGMENT
        return torch.float32 if one and t.dtype != torch.float64 else torch.float64

    def sums(self, t: torch.Tensor) -> Sums:
        """Per-segment sums of `t` (chunk-shaped terms)."""
        acc = self._acc(t)
        return Sums(tuple(v for s in self.segments(t) for v in s.sum(dim=1, dtype=acc).tolist()))

    def norms(self, t: torch.Tensor) -> Norms:
        """Per-segment 2-norms of `t`."""
        acc = self._acc(t)
        return Norms(tuple(v for s in self.segments(t)
                           for v in torch.linalg.vector_norm(s, dim=1, dtype=acc).tolist()))

    def uniform(self, i: int) -> torch.Tensor:
        """Counter-based uniform draws in [0, 1) for this chunk's elements of input x_i."""
        from mergeflow.methods.draws import uniform

        return uniform(self.keys[i], self.offset, self.shape)


@dataclass(frozen=True)
class Pass:
    """One reduction pass: chunk -> partial; the per-block partials -> new statistics."""

    partial: Callable[[Chunk, dict], dict]
    finish: Callable[[list[dict], dict], dict]
    skip: Callable[[dict], bool] = lambda stats: False  # a pass whose result is not needed


@dataclass(frozen=True)
class Program:
    """A method's work on one tensor: reduction passes, then apply (see the module doc)."""

    apply: Callable[[Chunk, dict], torch.Tensor]
    passes: tuple[Pass, ...] = ()
    row_local: bool = False  # apply/partials use whole vectors along the last dim: a 1-D tensor is one chunk
    splittable: bool = True  # the engine may split the tensor into row blocks across tasks


@dataclass(frozen=True)
class Meta:
    """What a method's program may depend on besides the data."""

    shape: tuple[int, ...]
    dtype: torch.dtype  # the compute dtype (all inputs share it)
    inputs: int  # len(xs)
    base: bool
    params: dict[str, Any]


# ----------------------------------------------------------------------------- the driver

Source = Callable[[int, int], tuple[list[torch.Tensor], torch.Tensor | None]]  # rows -> (xs, base)


def chunk_ranges(r0: int, r1: int, step: int) -> Iterator[tuple[int, int]]:
    for a in range(r0, r1, step):
        yield a, min(r1, a + step)


def reduce_pass(program: Program, k: int, source: Source, layout: Layout, stats: dict,
                rows: tuple[int, int], elements: int, keys: tuple[int, ...] = (), block: int = 0,
                memo: dict | None = None) -> dict:
    """Pass k over rows [rows[0], rows[1]) (a block, or the whole tensor): its partial.
    `memo`: per chunk, what a pass may keep for the next ones (a mask, say), when the
    caller can hold it (the tensor's inputs are held anyway)."""
    step = layout.chunk_rows(elements, reduction=True, whole_rows_of_1d=program.row_local)
    part: dict | None = None
    carry: dict = {}
    for a, b in chunk_ranges(*rows, step):
        xs, base = source(a, b)
        chunk = Chunk(xs, base, a, b, layout, keys, block, carry, None if memo is None else memo.setdefault((a, b), {}))
        part = combine(part, program.passes[k].partial(chunk, stats))
    return part or {}


def apply_rows(program: Program, source: Source, layout: Layout, stats: dict, rows: tuple[int, int],
               elements: int, emit: Callable[[int, int, torch.Tensor], None], keys: tuple[int, ...] = (),
               block: int = 0, device: torch.device | None = None, carry: dict | None = None,
               memo: dict | None = None) -> None:
    """Apply over rows [rows[0], rows[1]) chunk by chunk; `emit(r0, r1, out)` takes each result.
    `carry`: apply's state from the chunks before rows[0] in this block (default: none);
    `memo`: what the reduction passes kept per chunk (the chunks are then theirs)."""
    step = layout.chunk_rows(elements, reduction=memo is not None, whole_rows_of_1d=program.row_local)
    carry = {} if carry is None else carry
    for a, b in chunk_ranges(*rows, step):
        xs, base = source(a, b)
        if device is not None and device.type != "cpu":
            xs, base = [x.to(device) for x in xs], (base.to(device) if base is not None else None)
        kept = None if memo is None else memo.get((a, b), {})
        emit(a, b, program.apply(Chunk(xs, base, a, b, layout, keys, block, carry, kept), stats))


def run_program(program: Program, source: Source, layout: Layout, *, elements: int,
                emit: Callable[[int, int, torch.Tensor], None], keys: tuple[int, ...] = (),
                device: torch.device | None = None) -> dict:
    """Every pass over the whole tensor in order, then apply; returns the statistics. What
    passes keep per chunk is held until the apply (the tensors are in memory anyway)."""
    stats: dict = {}
    rows, memo = (0, layout.rows), {}
    for k, p in enumerate(program.passes):
        if not p.skip(stats):
            part = reduce_pass(program, k, source, layout, stats, rows, elements, keys, memo=memo)
            stats.update(p.finish([part], stats))
    apply_rows(program, source, layout, stats, rows, elements, emit, keys, device=device, memo=memo)
    return stats


def run_whole(program_of: Callable[[Meta], Program], xs: list[torch.Tensor], base: torch.Tensor | None,
              params: dict[str, Any], *, keys: tuple[int, ...] = (), chunk_elements: int | None = None) -> torch.Tensor:
    """Merge whole in-memory tensors: the method's program over them (one chunk unless
    `chunk_elements` is given: any chunking gives the same bytes)."""
    first = xs[0] if xs else base
    shape = tuple(first.shape)
    layout = Layout(shape)
    if layout.numel == 0:
        program = program_of(Meta(shape, first.dtype, len(xs), base is not None, params))
        out = program.apply(Chunk(list(xs), base, 0, layout.rows, layout, keys), {})
        return out
    program = program_of(Meta(shape, first.dtype, len(xs), base is not None, params))
    view = [x.reshape(layout.rows, *shape[1:]) if shape else x.reshape(1) for x in xs]
    bview = (base.reshape(layout.rows, *shape[1:]) if shape else base.reshape(1)) if base is not None else None

    def source(a: int, b: int):
        return [v[a:b] for v in view], (bview[a:b] if bview is not None else None)

    parts: list[torch.Tensor] = []
    run_program(program, source, layout, elements=chunk_elements or max(1, layout.numel),
                emit=lambda a, b, out: parts.append(out), keys=keys)
    out = torch.cat([p.reshape(p.shape[0] if shape else 1, *shape[1:]) for p in parts]) if len(parts) > 1 else parts[0]
    return out.reshape(shape)
