"""The memory budget: how each tensor job runs (chunk size, resident or re-read, row blocks)
and the peak memory to expect.

`--memory-limit M` bounds a worker's anonymous memory: heap and tensors. Every tensor runs as
its method's passes over row chunks (methods/passes.py), so a task holds a few chunks of its
inputs whatever the tensor's size: its *working set* is, per chunk element, each input's read
buffer and its copy in the compute dtype, plus the method's temporaries (ACCUMULATOR + 3x the
compute itemsize, plus STATISTICS per input for methods with reduction passes). A worker runs
T tasks at once (its threads), and one more may be starting, so one task may use
(M - BASELINE) / (T + 1), BASELINE being the process before its first tensor.

A tensor with reduction passes whose inputs and chunk fit that share is *resident*: its inputs
are read once and kept for all passes (one read instead of one per pass), and what a pass keeps
per chunk for the next (a sparsifier's mask: a byte per element and model) is kept with them. A tensor of more
than BLOCK_ELEMENTS elements whose method allows it is split into row blocks that run as
separate tasks (a reduction task per pass and block, an apply task per block), so one huge
embedding uses every worker.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from mergeflow.dtypes import DTYPE_BYTES, itemsize
from mergeflow.exec.jobs import TensorJob
from mergeflow.methods.passes import Program

BASELINE = 250_000_000  # `mergeflow run` before its first tensor: 203 MB anonymous (297 MB RSS) measured
ACCUMULATOR = 4  # float32 accumulator (float64 inputs: 8)
STATISTICS = 8  # per element and input, methods with passes: keys, masks, draws
MIN_TASK = 8_000_000  # one task's share is never taken as less than this
# Elements per chunk. CPU: a chunk's float32 temporaries (2 MB) stay in the L3 cache and below
# glibc's mmap threshold (4 MB, cli/process.py), so they are reused from the heap; smaller
# chunks cost more in per-chunk Python than they save (the 2 GB linear benchmark, warm, 2
# threads: 5.7 s at 128k elements, 3.3 s at 256k, 2.4-3.5 s at 500k-512k; 1M-element
# temporaries pass the threshold: 4.5-7 s). Just under 2 MB of float32, where torch starts
# aligning blocks to huge pages (at 2^19 elements those left 342-357 MB of peak anonymous
# memory against 247-268 MB). Other devices: large enough that a copy to the device and a
# kernel launch are cheap.
CHUNK_ELEMENTS = 500_000
DEVICE_CHUNK_ELEMENTS = 1 << 22
BLOCK_ELEMENTS = 1 << 26  # tensors above this many elements are split into row blocks
RESIDENT_WITHOUT_LIMIT = 1_000_000_000  # no --memory-limit: keep inputs of up to this many bytes


@dataclass(frozen=True)
class Budget:
    """Per worker: the memory limit in bytes (None: none) and the tasks run at once."""

    memory_limit: int | None
    threads: int

    @property
    def per_task(self) -> int | None:
        if not self.memory_limit:
            return None
        return max((self.memory_limit - BASELINE) // (self.threads + 1), MIN_TASK)


PROCESS_THREADS = 4  # threads of each default process worker (cores allowing)


def local_sizes(workers: int | None, threads_per_worker: int | None, processes: bool) -> tuple[int, int]:
    """(workers, threads per worker) of a local cluster, the one sizing rule (cluster.py makes
    clusters by it; the budget and torch's threads follow it): the cores divided among the
    workers; in-process, one worker with a thread per core; `--processes`, one worker per
    PROCESS_THREADS cores (at least one). A process worker costs ~280 MB before its first
    tensor and its start-up (spawning Python, importing torch), and on 2 cores one worker of 2
    threads merged as fast as 2 of 1 thread (benchmarks/bench_processes.py)."""
    cores = os.cpu_count() or 1
    workers = workers or (max(1, cores // PROCESS_THREADS) if processes else 1)
    return workers, threads_per_worker or max(1, cores // workers)


def parse_limit(text: str | int | None, workers: int = 1) -> int | None:
    """`--memory-limit` in bytes as Dask reads it (`4GB`, `4GiB`, `auto`); None for none."""
    if text in (None, 0, "0", ""):
        return None
    if isinstance(text, int):
        return text
    if text.strip().lower() == "auto":
        import psutil

        return psutil.virtual_memory().total // max(1, workers)
    from dask.utils import parse_bytes

    return parse_bytes(text) or None


def budget_for(memory_limit: str | int | None, threads_per_worker: int | None = None,
               workers: int | None = None, processes: bool = False) -> Budget:
    workers, threads = local_sizes(workers, threads_per_worker, processes)
    return Budget(parse_limit(memory_limit, workers), threads)


def chunk_bytes(job: TensorJob, program: Program, elements: int) -> int:
    """Anonymous bytes of `elements` chunk elements: read buffers, casts, temporaries."""
    c = itemsize(job.dtype)
    per = sum(DTYPE_BYTES[s.dtype] + (c if DTYPE_BYTES[s.dtype] != c or s.lora or job.vocab else 0)
              for s in job.sources)
    temps = (8 if c == 8 else ACCUMULATOR) + 3 * c + (STATISTICS * job.xs if program.passes else 0)
    return (per + temps) * elements


def _chunk_elements(job: TensorJob, program: Program) -> int:
    """The elements of the job's largest chunk (reduction chunks are whole segments)."""
    layout = job.layout
    rows = max(layout.chunk_rows(job.chunk, reduction=r, whole_rows_of_1d=program.row_local)
               for r in ((False, True) if program.passes else (False,)))
    return min(layout.numel, rows * layout.row)


def working_set(job: TensorJob) -> int:
    """Anonymous bytes one task of `job` holds (its largest task, for a split tensor), with
    what computing the chunks of another stage's tensors it reads holds."""
    program = job.program()
    held = sum(s.nbytes for s in job.sources) + job.layout.numel * job.xs if job.resident else 0
    if job.blocks and job.resident:
        held = max(r1 - r0 for r0, r1 in job.blocks) * sum(s.row_bytes for s in job.sources)
    producers = sum(working_set(s.producer) for s in job.sources if s.producer is not None)
    return held + chunk_bytes(job, program, _chunk_elements(job, program)) + producers


def size_job(job: TensorJob, budget: Budget) -> TensorJob:
    """`job` with its chunk size, residency and row blocks chosen for `budget`. A tensor that
    reads another stage's tensors runs in one task (their rows are computed in order), and
    those producers are read chunk by chunk, never held (their own task may hold them)."""
    chunk = CHUNK_ELEMENTS if job.device == "cpu" else DEVICE_CHUNK_ELEMENTS
    sources = tuple(dataclasses.replace(s, producer=dataclasses.replace(size_job(s.producer, budget), resident=False,
                                                                        blocks=()))
                    if s.producer is not None else s for s in job.sources)
    job = dataclasses.replace(job, chunk=chunk, sources=sources)
    program = job.program()
    layout = job.layout
    stored = sum(s.nbytes for s in job.sources) + layout.numel * job.xs  # + a kept mask per model
    limit = budget.per_task if budget.per_task is not None else RESIDENT_WITHOUT_LIMIT
    gathers = job.vocab is not None and job.computed  # rows of an intermediate gathered by token: held whole
    resident = (bool(program.passes) or gathers) and stored + chunk_bytes(job, program, _chunk_elements(job, program)) <= limit
    split = layout.numel > BLOCK_ELEMENTS and program.splittable and not job.computed
    blocks = _blocks(job, program) if split else ()
    if blocks and resident:  # a block's task holds its own rows only
        resident = max(r1 - r0 for r0, r1 in blocks) * sum(s.row_bytes for s in job.sources) <= limit
    return dataclasses.replace(job, resident=resident, blocks=blocks)


def _blocks(job: TensorJob, program: Program) -> tuple[tuple[int, int], ...]:
    """Row blocks of about BLOCK_ELEMENTS elements, each a whole number of segments (so every
    statistic's segments lie inside one block; methods/passes.py)."""
    layout = job.layout
    if layout.rows < 2 or (program.row_local and len(layout.shape) <= 1):
        return ()
    g = layout.seg_rows
    rows = max(g, BLOCK_ELEMENTS // max(1, layout.row) // g * g)
    if rows >= layout.rows:
        return ()
    return tuple((r0, min(layout.rows, r0 + rows)) for r0 in range(0, layout.rows, rows))


@dataclass(frozen=True)
class Estimate:
    """Expected peak memory of one worker, and the tensors that break the budget."""

    budget: Budget
    peak: int
    largest: str  # the tensor with the largest task
    largest_bytes: int
    resident: int  # tensors whose inputs are read once and kept for their passes
    split: int  # tensors split into row blocks
    over: tuple[tuple[str, str, int], ...]  # (tensor, method, working set) above one task's share

    def text(self) -> str:
        b = self.budget
        limit = f"--memory-limit {_gb(b.memory_limit)}" if b.memory_limit else "no --memory-limit"
        return (f"estimated peak per worker {_gb(self.peak)} (the process ~{_gb(BASELINE)}, plus "
                f"the {b.threads + 1} largest tasks that can be in memory together: {b.threads} "
                f"thread(s) and one starting; largest {self.largest} ~{_gb(self.largest_bytes)}); {limit}; "
                f"every tensor runs in row chunks ({self.resident} read once and kept for their passes, "
                f"{self.split} split into row blocks)")

    def warnings(self) -> list[str]:
        b = self.budget
        if not self.over or not b.memory_limit:
            return []
        name, method, size = max(self.over, key=lambda o: o[2])
        return [f"{len(self.over)} tensor(s) need more than one task's share of --memory-limit "
                f"({_gb(b.per_task)} of {_gb(b.memory_limit)} with {b.threads} threads) even in row "
                f"chunks, e.g. {name} ({method}: ~{_gb(size)}): rows that long need more; expect a peak "
                f"near {_gb(self.peak)}: raise --memory-limit"]


def estimate(jobs: list[TensorJob], budget: Budget) -> Estimate:
    """BASELINE plus the T + 1 largest tasks that can be in memory together."""
    sizes = sorted(((working_set(j), j.name, j.method) for j in jobs), reverse=True)
    top = sizes[: budget.threads + 1]
    largest = top[0] if top else (0, "", "")
    over = tuple((n, m, s) for s, n, m in sizes if budget.per_task and s > budget.per_task)
    return Estimate(budget, BASELINE + sum(s for s, _, _ in top), largest[1], largest[0],
                    sum(1 for j in jobs if j.resident), sum(1 for j in jobs if j.blocks), over)


def _gb(n: int | None) -> str:
    from mergeflow.spec.sizes import human_bytes

    return human_bytes(n or 0)


def minimum_limit(budget: Budget) -> int:
    """The smallest --memory-limit that leaves every task at least MIN_TASK."""
    return BASELINE + (budget.threads + 1) * MIN_TASK

