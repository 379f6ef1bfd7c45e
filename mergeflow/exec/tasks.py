"""The functions graph tasks run: one tensor's passes in one task, or a row block's share of them.

Each takes plain data (a TensorJob, statistics dicts, partials) so a graph pickles to any
worker. `run_tensor` does everything for one tensor: every reduction pass over its row chunks,
then the apply, whose chunks are cast to the output dtype, checked for NaN/Inf and written at
their offsets; then the journal. A tensor split into row blocks runs as `reduce_block` per
(pass, block), `combine` per pass, `apply_block` per block and `commit`. Reductions read on
the CPU; the apply runs on the job's device. Errors in a method's numbers (a ValueError from
its program) become MergeflowErrors naming the tensor.
"""

from __future__ import annotations

import contextlib
import math

import torch

from mergeflow.errors import MergeflowError
from mergeflow.exec.jobs import Produced, TensorJob
from mergeflow.exec.journal import record_done
from mergeflow.exec.read import Stored, inputs
from mergeflow.exec.write import sync_file, write_at
from mergeflow.methods.passes import Program, apply_rows, reduce_pass


@contextlib.contextmanager
def _named(job: TensorJob):
    """A method's ValueError (bad numbers for this tensor) as a user error naming it."""
    try:
        yield
    except ValueError as e:
        raise MergeflowError(f"merge of {job.label}: {e}") from None


def _rows(job: TensorJob, program: Program) -> int:
    """The most rows any chunk of this job has (the read buffers' size)."""
    layout = job.layout
    return max(layout.chunk_rows(job.chunk, reduction=r, whole_rows_of_1d=program.row_local) for r in (True, False))


def _statistics(job: TensorJob, program: Program, source, memo: dict | None = None) -> dict:
    """Every reduction pass of the whole tensor, in order."""
    stats: dict = {}
    if job.layout.numel:
        for k, p in enumerate(program.passes):
            if not p.skip(stats):
                part = reduce_pass(program, k, source, job.layout, stats, (0, job.layout.rows), job.chunk,
                                   job.keys, memo=memo)
                stats |= p.finish([part], stats)
    return stats


def run_tensor(job: TensorJob, *produced: Produced | None) -> int:
    """Merge and write one whole tensor; returns the bytes written. `produced[i]`: the
    statistics of source i when it is another stage's tensor (exec/read.py, Computed)."""
    with _named(job):
        program = job.program()
        memo = {} if job.resident else None  # held inputs: hold what passes keep per chunk too
        with inputs(job, _rows(job, program), produced) as source:
            stats = _statistics(job, program, source, memo)
            bad = _apply(job, program, source, stats, (0, job.layout.rows), memo=memo)
    _check(job, bad)
    _record(job)
    return job.target.nbytes


def statistics(job: TensorJob, *produced: Produced | None) -> Produced:
    """An intermediate tensor of a multi-stage merge: its reduction passes only (its rows are
    computed where they are read), with the statistics of the tensors it reads in turn."""
    with _named(job):
        program = job.program()
        with inputs(job, _rows(job, program), produced) as source:
            return Produced(_statistics(job, program, source), tuple(produced))


def reduce_block(job: TensorJob, k: int, block: int, stats: dict) -> dict:
    """Pass k over one row block: its partial (empty when the pass is skipped)."""
    with _named(job):
        program = job.program()
        if program.passes[k].skip(stats):
            return {}
        with inputs(job, _rows(job, program)) as source:
            return reduce_pass(program, k, source, job.layout, stats, job.blocks[block], job.chunk, job.keys, block)


def combine(job: TensorJob, k: int, stats: dict | None, *partials: dict) -> dict:
    """The statistics after pass k, from every block's partial (in block order)."""
    stats = dict(stats or {})
    with _named(job):
        p = job.program().passes[k]
        if not p.skip(stats):
            stats |= p.finish(list(partials), stats)
    return stats


def apply_block(job: TensorJob, block: int, stats: dict | None) -> tuple[int, int]:
    """Apply over one row block and write it: (bytes written, NaN/Inf count)."""
    with _named(job):
        program = job.program()
        with inputs(job, _rows(job, program)) as source:
            bad = _apply(job, program, source, stats or {}, job.blocks[block], block)
    r0, r1 = job.blocks[block]
    return (r1 - r0) * _out_row(job), bad


def commit(job: TensorJob, *applied: tuple[int, int]) -> int:
    """A split tensor is done when every block is: check it, then journal it."""
    _check(job, sum(bad for _, bad in applied))
    _record(job)
    return sum(n for n, _ in applied)


def _out_row(job: TensorJob) -> int:
    return job.target.nbytes // job.layout.rows if job.layout.rows else 0


def _apply(job: TensorJob, program: Program, source, stats: dict, rows: tuple[int, int], block: int = 0,
           memo: dict | None = None) -> int:
    """Apply over `rows`, writing each chunk at its offset; returns the NaN/Inf count."""
    out_dtype, row = getattr(torch, job.out_dtype), _out_row(job)
    bad = 0

    def emit(r0: int, r1: int, out: torch.Tensor) -> None:
        nonlocal bad
        out = out.to(out_dtype)
        bad += _bad_values(out)
        _write_part(job, job.target.begin + r0 * row, row * (r1 - r0), out.cpu())

    if job.layout.numel == 0:
        return 0
    apply_rows(program, source, job.layout, stats, rows, job.chunk, emit, job.keys, block,
               torch.device(job.device), memo=memo)
    return bad


def _bad_values(out: torch.Tensor) -> int:
    """How many values are NaN or Inf. NaN and Inf reach the sum, so a finite sum proves
    every element finite (one fast pass; isfinite().all() measured 20-40x slower). Only a
    non-finite sum, which an overflow of finite values can also give, needs the count."""
    if not out.is_floating_point() or bool(torch.isfinite(out.sum())):
        return 0
    return int((~torch.isfinite(out)).sum())


def _check(job: TensorJob, bad: int) -> None:
    if not bad:
        return
    poisoned = nonfinite_inputs(job)
    if poisoned:
        raise MergeflowError(f"merge of {job.label} ({job.method}) produced {bad} NaN/Inf values: "
                             + "; ".join(poisoned) + ". Replace that model's file or leave the model out")
    raise MergeflowError(f"merge of {job.label} ({job.method}) produced {bad} NaN/Inf values; check the "
                         "inputs and parameters for this tensor (a weight large enough to overflow?)")


def nonfinite_inputs(job: TensorJob) -> list[str]:
    """The inputs of `job` that already hold NaN or Inf, as they are stored."""
    found = []
    for src in job.sources:
        if src.producer is not None:  # another stage's tensor: its own check names its inputs
            continue
        with Stored(src, resident=False) as stored:
            rows = src.shape[0] if src.shape else 1
            step = max(1, job.chunk // max(1, math.prod(src.shape[1:])))
            buf = torch.empty(src.row_bytes * min(step, rows), dtype=torch.uint8)
            count = 0
            for r0 in range(0, rows, step):
                t = stored.rows(r0, min(rows, r0 + step), buf)
                if t.is_floating_point():
                    count += int((~torch.isfinite(t)).sum())
            if count:
                found.append(f"input model {src.label} tensor {src.tensor} already holds {count} NaN/Inf values")
    return found


def _write_part(job: TensorJob, begin: int, nbytes: int, tensor: torch.Tensor) -> None:
    """Put `tensor`'s bytes (a row chunk of the output) at `begin`."""
    data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    if data.nbytes != nbytes:
        raise MergeflowError(f"write of {job.name}: {data.nbytes} bytes, but the plan expects {nbytes}")
    try:
        write_at(job.target.path, begin, data)
    except OSError as e:
        raise MergeflowError(f"write of {job.name} to {job.target.path} failed: {e.strerror or e}") from e


def _record(job: TensorJob) -> None:
    try:
        record_done(job.target.journal, job.name)
    except OSError as e:
        raise MergeflowError(f"write of {job.name} to {job.target.path} failed: {e.strerror or e}") from e


def finalize(path: str, size: int, *written: int) -> int:
    """Sync a shard whose tensors are all written, and check its size."""
    try:
        actual = sync_file(path)
    except OSError as e:
        raise MergeflowError(f"{path}: cannot sync the finished shard: {e.strerror or e}") from e
    if actual != size:
        raise MergeflowError(f"{path}: {actual} bytes after writing, expected {size}")
    return sum(written)
