"""The memory budget: what one merge task holds, streamed tensors and lanes, the expected peak.

`--memory-limit M` bounds a worker's anonymous memory: heap and tensors, what can run a
machine out of memory. Inputs of whole-tensor merges are mapped from their files
(io/models.py) and used in place when their dtype is the compute dtype; those pages are page
cache, which the kernel reclaims under pressure, so the resident size (RSS) may exceed M by
the inputs of the tensors in flight (and ~100 MB of mapped libraries).

A tensor whose method is row-separable (methods/base.py) and draws nothing at random, with
no LoRA input and no vocabulary alignment, is *streamed* (`streams`, tasks.stream): one task
reads, merges and writes it CHUNK_ELEMENTS at a time through reused buffers, so it holds a
few chunks whatever the tensor's size (a 128k-vocabulary embedding included). Other methods
need the whole tensor at once (top-k, norms, quantiles, L1 rescale, random draws).

A worker runs T tasks at once (its threads). Each task holds its tensor's *working set*: the
inputs that are copies (cast, LoRA, aligned, read buffers) plus the merge's temporaries. Per
element, measured on bfloat16: linear and task_arithmetic 10-12 bytes, dare_ties 18, ties 24
(a float32 accumulator, products, masks, sort indices). The estimate here is ACCUMULATOR +
3 x the compute itemsize, plus STATISTICS bytes per input for methods that are not
row-separable. Loads do not run ahead of merges: dask.order runs each merge right after its
loads and root-task queuing (worker-saturation 1.1) holds further loads back; measured on
the 2 GB benchmark, loaded inputs waiting for their merge never exceeded 2.3 x one tensor's
with T = 2. Merged tensors are released once written.

So one task may use (M - BASELINE) / (T + 1), BASELINE being the process before its first
tensor (Python, torch, Dask). Whole tensors whose working set exceeds that run in `lanes`: as
many at once as fit in M - BASELINE, each loading only once an earlier one is written. One
that alone exceeds M - BASELINE cannot be helped; plan and run say so.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from mergeflow.dtypes import DTYPE_BYTES
from mergeflow.methods import REGISTRY
from mergeflow.plan import MergePlan, TensorPlan

BASELINE = 250_000_000  # `mergeflow run` before its first tensor: 203 MB anonymous (297 MB RSS) measured
ACCUMULATOR = 4  # float32 accumulator (float64 inputs: 8)
STATISTICS = 8  # per element and input, whole-tensor methods: sort indices, masks, draws
MIN_TASK = 8_000_000  # one task's share is never taken as less than this
# Elements per row chunk of a streamed tensor (tasks.stream), at most. CPU: a chunk's float32
# temporaries (2 MB) stay in the L3 cache and below glibc's mmap threshold (4 MB, cli.py), so
# they are reused from the heap; smaller chunks cost more in per-chunk Python than they save
# (the 2 GB linear benchmark, warm, 2 threads: 5.7 s at 128k elements, 3.3 s at 256k, 2.4-3.5
# s at 500k-512k; 1M-element temporaries pass the threshold: 4.5-7 s). Just under 2 MB of
# float32, where torch starts aligning blocks to huge pages: at 2^19 elements those aligned
# blocks left 342-357 MB of peak anonymous memory against 247-268 MB. Other devices: large
# enough that a copy to the device and a kernel launch are cheap.
CHUNK_ELEMENTS = 500_000
DEVICE_CHUNK_ELEMENTS = 1 << 22


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


def worker_threads(threads_per_worker: int | None, workers: int | None, processes: bool) -> int:
    """A local worker's threads as cluster.py sizes them: one worker with a thread per core,
    or (`--processes`) a worker per core with one thread; `--threads-per-worker` wins."""
    cores = os.cpu_count() or 1
    return threads_per_worker or max(1, cores // (workers or (cores if processes else 1)))


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
    threads = worker_threads(threads_per_worker, workers, processes)
    return Budget(parse_limit(memory_limit, workers or 1), threads)


def _itemsize(dtype: str) -> int:
    from mergeflow.dtypes import TORCH_TO_CODE

    return DTYPE_BYTES[TORCH_TO_CODE[dtype]]


def streams(t: TensorPlan) -> bool:
    """Whether `t` is streamed: read, merged and written in row chunks by one task."""
    method = REGISTRY.get(t.method)
    return (method is not None and method.row_separable and not method.random and t.vocab is None
            and all(i.tensor.lora is None for i in t.all_inputs()))


def working_set(t: TensorPlan) -> int:
    """Anonymous bytes one task holds for tensor `t`: the inputs that are copies (cast to the
    compute dtype, LoRA applied, vocabulary-aligned, or from a .bin) and the merge's
    temporaries. Inputs used as stored are views of their mapped file: page cache, which the
    kernel reclaims under pressure, so they do not count. A streamed tensor holds the same
    for one row chunk (at least one row), plus a read buffer per input."""
    streamed = streams(t)
    elements = math.prod(t.shape)
    if streamed:
        elements = min(elements, max(CHUNK_ELEMENTS, math.prod(t.shape[1:])))
    sizes, copies = [], 0
    for i in t.all_inputs():
        stored = DTYPE_BYTES[i.tensor.dtype]
        size = _itemsize(t.compute_dtype) if t.compute_dtype else stored
        sizes.append(size)
        copied = size != stored or i.tensor.lora is not None or t.vocab is not None \
            or not i.tensor.file.endswith(".safetensors")
        copies += (size if copied else 0) + (stored if streamed else 0)
    c = max(sizes, default=4)
    temps = (8 if c == 8 else ACCUMULATOR) + 3 * c
    method = REGISTRY.get(t.method)
    if method is None or not method.row_separable:
        temps += STATISTICS * len(t.inputs)
    return (copies + temps) * elements


def fit_budget(plan: MergePlan, budget: Budget) -> MergePlan:
    """The plan with the tensors too large for one task's share in `lanes` chains
    (TensorPlan.after): each loads only once the tensor `lanes` places before it is written,
    so no more of them are in memory at once than the budget holds. Lanes change when
    tensors are computed, never their bytes, so the fingerprint stays."""
    per_task = budget.per_task
    if per_task is None:
        return plan
    tensors = [dataclasses.replace(t, after=None) for t in plan.tensors]
    heavy = [i for i, t in enumerate(tensors) if working_set(t) > per_task]
    k = lanes(plan, budget)
    for m, i in enumerate(heavy[k:]):
        tensors[i] = dataclasses.replace(tensors[i], after=tensors[heavy[m]].name)
    return dataclasses.replace(plan, tensors=tuple(tensors))


def lanes(plan: MergePlan, budget: Budget) -> int:
    """How many whole tensors above one task's share may be in memory at once: as many as
    fit in what the limit leaves beside the process (at least one; at most the threads)."""
    per_task = budget.per_task
    sizes = [working_set(t) for t in plan.tensors]
    heavy = [s for s in sizes if per_task and s > per_task]
    if not heavy or not budget.memory_limit:
        return budget.threads
    return max(1, min(budget.threads, (budget.memory_limit - BASELINE) // max(heavy)))


@dataclass(frozen=True)
class Estimate:
    """Expected peak memory of one worker, and the tensors that break the budget."""

    budget: Budget
    peak: int
    largest: str  # the tensor with the largest task
    largest_bytes: int
    streamed: int  # tensors read, merged and written in row chunks
    over: tuple[tuple[str, str, int], ...]  # (tensor, method, working set) above per_task
    lanes: int = 1  # how many of those may be in memory at once

    def text(self) -> str:
        b = self.budget
        limit = f"--memory-limit {_gb(b.memory_limit)}" if b.memory_limit else "no --memory-limit"
        if self.streamed:
            limit += f", {self.streamed} tensor(s) streamed in row chunks"
        if self.over:
            limit += f", {len(self.over)} whole tensor(s) over one task's share, {self.lanes} at a time"
        return (f"estimated peak per worker {_gb(self.peak)} (the process ~{_gb(BASELINE)}, plus "
                f"the {b.threads + 1} largest tasks that can be in memory together: {b.threads} "
                f"thread(s) and one queued; largest {self.largest} ~{_gb(self.largest_bytes)}); {limit}")

    def warnings(self) -> list[str]:
        b = self.budget
        if not self.over or not b.memory_limit:
            return []
        name, method, size = max(self.over, key=lambda o: o[2])
        why = (f"{len(self.over)} tensor(s) need more than one task's share of --memory-limit "
               f"({_gb(b.per_task)} of {_gb(b.memory_limit)} with {b.threads} threads), e.g. {name} "
               f"({method}: ~{_gb(size)}), and {method} needs each tensor whole (whole-tensor "
               "statistics), so it cannot be streamed in row chunks")
        if size > b.memory_limit - BASELINE:
            return [f"{why}; expect a peak near {_gb(self.peak)}, above the limit: raise --memory-limit"]
        if self.lanes < b.threads:
            return [f"{why}; they are merged {self.lanes} at a time to stay within the limit (slower): "
                    "a larger --memory-limit lets more run in parallel"]
        return []


def estimate(plan: MergePlan, budget: Budget) -> Estimate:
    """BASELINE plus the T + 1 largest tasks that can be in memory together (of the chained
    too-large tensors, only `lanes`)."""
    k = lanes(plan, budget)
    tasks: list[tuple[int, str]] = []
    heavy: list[tuple[int, str]] = []
    over = []
    for t in plan.tensors:
        size = working_set(t)
        if budget.per_task and size > budget.per_task:
            over.append((t.name, t.method, size))
            heavy.append((size, t.name))
        else:
            tasks.append((size, t.name))
    top = sorted(sorted(heavy, reverse=True)[:k] + tasks, reverse=True)[: budget.threads + 1]
    largest = top[0] if top else (0, "")
    return Estimate(budget, BASELINE + sum(s for s, _ in top), largest[1], largest[0],
                    sum(1 for t in plan.tensors if streams(t)), tuple(over), k)


def _gb(n: int | None) -> str:
    from mergeflow.spec.sizes import human_bytes

    return human_bytes(n or 0)
