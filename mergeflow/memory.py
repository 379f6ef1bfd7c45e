"""The memory budget: what one merge task holds, row blocks and lanes, the expected peak.

`--memory-limit M` bounds a worker's anonymous memory: heap and tensors, what can run a
machine out of memory. Inputs are mapped from their files (io/models.py) and used in place
when their dtype is the compute dtype; those pages are page cache, which the kernel reclaims
under pressure, so the resident size (RSS) may exceed M by the inputs of the tensors in
flight (and ~100 MB of mapped libraries).

A worker runs T tasks at once (its threads). Each merge task holds its tensor's *working
set*: the inputs that are copies (cast, LoRA, aligned) plus the merge's temporaries. Per
element, measured on bfloat16: linear and task_arithmetic 10-12 bytes, dare_ties 18, ties 24
(a float32 accumulator, products, masks, sort indices). The estimate here is ACCUMULATOR +
3 x the compute itemsize, plus STATISTICS bytes per input for methods that are not
row-separable. Loads do not run ahead of merges: dask.order runs each merge right after its
loads and root-task queuing (worker-saturation 1.1) holds further loads back; measured on
the 2 GB benchmark, loaded inputs waiting for their merge never exceeded 2.3 x one tensor's
with T = 2. Merged tensors are released once written.

So one task may use (M - BASELINE) / (T + 1), BASELINE being the process before its first
tensor (Python, torch, Dask). A tensor whose working set exceeds that is merged in row
blocks when its method is row-separable (methods/base.py) and it has no LoRA input and no
vocabulary alignment: each block loads only its rows of every input and writes them at its
own offset (rows are contiguous in row-major safetensors storage). Other methods need the
whole tensor at once (top-k, norms, quantiles, L1 rescale, random draws), so such tensors run
in `lanes`: as many at once as fit in M - BASELINE, each loading only once an earlier one is
written. One that alone exceeds M - BASELINE cannot be helped; plan and run say so.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from mergeflow.io.models import DTYPE_BYTES
from mergeflow.io.shards import tensor_nbytes
from mergeflow.methods import REGISTRY
from mergeflow.plan import MergePlan, TensorPlan

BASELINE = 250_000_000  # `mergeflow run` before its first tensor: 203 MB anonymous (297 MB RSS) measured
ACCUMULATOR = 4  # float32 accumulator (float64 inputs: 8)
STATISTICS = 8  # per element and input, whole-tensor methods: sort indices, masks, draws
MIN_TASK = 8_000_000  # never plan blocks smaller than this working set


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
    from mergeflow.io.models import TORCH_TO_CODE

    return DTYPE_BYTES[TORCH_TO_CODE[dtype]]


def working_set(t: TensorPlan, rows: int | None = None) -> int:
    """Anonymous bytes one task holds for tensor `t`, or for `rows` of its rows: the inputs
    that are copies (cast to the compute dtype, LoRA applied, vocabulary-aligned, or from a
    .bin) and the merge's temporaries. Inputs used as stored are views of their mapped file:
    page cache, which the kernel reclaims under pressure, so they do not count."""
    out_rows = t.shape[0] if t.shape else 1
    frac = 1.0 if rows is None or not out_rows else rows / out_rows
    sizes, copies = [], 0.0
    for i in t.all_inputs():
        stored = DTYPE_BYTES[i.tensor.dtype]
        size = _itemsize(t.compute_dtype) if t.compute_dtype else stored
        sizes.append(size)
        if size != stored or i.tensor.lora is not None or t.vocab is not None \
                or not i.tensor.file.endswith(".safetensors"):
            copies += size * math.prod(i.tensor.shape) * frac
    c = max(sizes, default=4)
    temps = (8 if c == 8 else ACCUMULATOR) + 3 * c
    method = REGISTRY.get(t.method)
    if method is None or not method.row_separable:
        temps += STATISTICS * len(t.inputs)
    return int(copies + temps * math.prod(t.shape) * frac)


def can_split(t: TensorPlan) -> bool:
    method = REGISTRY.get(t.method)
    return (method is not None and method.row_separable and not method.random and t.vocab is None
            and len(t.shape) >= 1 and t.shape[0] > 1 and all(i.tensor.lora is None for i in t.all_inputs()))


def row_blocks(t: TensorPlan, per_task: int) -> tuple[tuple[int, int], ...]:
    """Row ranges [r0, r1) tiling t's rows, each block's working set within `per_task`."""
    rows = t.shape[0]
    per_row = working_set(t, 1)
    count = math.ceil(rows / max(1, per_task // max(per_row, 1)))
    return tuple((k * rows // count, (k + 1) * rows // count) for k in range(count))


def block_bytes(t: TensorPlan, rows: tuple[int, int]) -> tuple[int, int]:
    """The absolute byte range of output rows [r0, r1) in t's shard."""
    row = tensor_nbytes(t.out_dtype, t.shape[1:]) if t.shape else t.nbytes
    return t.begin + rows[0] * row, t.begin + rows[1] * row


def fit_budget(plan: MergePlan, budget: Budget) -> MergePlan:
    """The plan with row blocks on every splittable tensor too large for one task's share,
    and the other too-large tensors in `lanes` chains (TensorPlan.after): each loads only
    once the tensor `lanes` places before it is written, so no more of them are in memory
    at once than the budget holds. Blocks and lanes change how tensors are computed, never
    their bytes, so the fingerprint stays."""
    per_task = budget.per_task
    if per_task is None:
        return plan
    tensors, heavy = [], []
    for t in plan.tensors:
        blocks: tuple[tuple[int, int], ...] = ()
        if working_set(t) > per_task and can_split(t):
            blocks = row_blocks(t, per_task)
        t = dataclasses.replace(t, blocks=blocks if len(blocks) > 1 else (), after=None)
        if working_set(t) > per_task and not t.blocks:
            heavy.append(len(tensors))
        tensors.append(t)
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
    blocked: int  # tensors merged in row blocks
    over: tuple[tuple[str, str, int], ...]  # (tensor, method, working set) above per_task
    lanes: int = 1  # how many of those may be in memory at once

    def text(self) -> str:
        b = self.budget
        limit = (f"--memory-limit {_gb(b.memory_limit)}, {self.blocked} tensor(s) in row blocks"
                 if b.memory_limit else "no --memory-limit, so every tensor is merged whole")
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
               "statistics), so it cannot be split into row blocks")
        if size > b.memory_limit - BASELINE:
            return [f"{why}; expect a peak near {_gb(self.peak)}, above the limit: raise --memory-limit"]
        if self.lanes < b.threads:
            return [f"{why}; they are merged {self.lanes} at a time to stay within the limit (slower): "
                    "a larger --memory-limit lets more run in parallel"]
        return []


def estimate(plan: MergePlan, budget: Budget) -> Estimate:
    """BASELINE plus the T + 1 largest tasks that can be in memory together (a block is a
    task; of the chained too-large tensors, only `lanes`), after `fit_budget`."""
    plan = fit_budget(plan, budget)
    k = lanes(plan, budget)
    tasks: list[tuple[int, str]] = []
    heavy: list[tuple[int, str]] = []
    over = []
    for t in plan.tensors:
        if t.blocks:
            tasks += [(working_set(t, r1 - r0), t.name) for r0, r1 in t.blocks]
            continue
        size = working_set(t)
        if budget.per_task and size > budget.per_task:
            over.append((t.name, t.method, size))
            heavy.append((size, t.name))
        else:
            tasks.append((size, t.name))
    top = sorted(sorted(heavy, reverse=True)[:k] + tasks, reverse=True)[: budget.threads + 1]
    largest = top[0] if top else (0, "")
    return Estimate(budget, BASELINE + sum(s for s, _ in top), largest[1], largest[0],
                    sum(1 for t in plan.tensors if t.blocks), tuple(over), k)


def _gb(n: int | None) -> str:
    from mergeflow.progress import human_bytes

    return human_bytes(n or 0)
