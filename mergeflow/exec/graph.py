"""Translate a MergePlan into a Dask graph: {key: Task}. Nothing else happens here.

Keys name the dashboard groups: ("load", rank, model, tensor), ("merge-<method>", rank,
tensor), ("write", rank, tensor), ("finalize", shard). `rank` counts down in output file
order, because dask.order takes the largest key first among ties. A streamed tensor
(memory.streams: row-separable merges) is one task that reads, merges and writes it in row
chunks, keyed like its merge. With `fuse=True` each other tensor's loads, merge and write
are one task too (keyed like its write), so no tensor crosses the network between process
workers. A tensor with TensorPlan.after loads only once that tensor is written (tensors too
large to be in memory together).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dask.task_spec import Task, TaskRef

from mergeflow.exec import tasks
from mergeflow.exec.budget import streams
from mergeflow.exec.journal import journal_path
from mergeflow.plan import MergePlan, TensorPlan


def merge_spec(plan: MergePlan, t: TensorPlan, device: str = "cpu") -> dict[str, Any]:
    return {"name": t.name, "method": t.method, "params": t.params, "inputs": len(t.inputs),
            "base": t.base is not None, "out_dtype": t.out_dtype, "seed": plan.seed, "device": device,
            "vocab": t.vocab, "shape": t.shape}


def build_graph(plan: MergePlan, out_dir: str | Path, *, device: str = "cpu",
                skip: frozenset[str] | set[str] = frozenset(), fuse: bool = False) -> tuple[dict, list, list]:
    """Return (graph, done keys, finalize keys): a done key is the task that finishes one
    tensor (its write, or its streamed merge) and returns the bytes it wrote; tensors named
    in `skip` are already written."""
    out_dir = Path(out_dir).resolve()
    journal = str(journal_path(out_dir))
    dsk: dict = {}
    n = len(plan.tensors)
    done = {t.name: _done_key(t, n - 1 - i) for i, t in enumerate(plan.tensors)}
    writes: dict[int, list] = {k: [] for k in range(len(plan.shards))}
    for i, t in enumerate(plan.tensors):
        if t.name in skip:
            continue
        rank, key = n - 1 - i, done[t.name]
        after = [TaskRef(done[t.after])] if t.after and t.after not in skip else []
        loads = [(inp.tensor.file, inp.tensor.name, inp.crop, t.compute_dtype, inp.tensor.lora)
                 for inp in t.all_inputs()]
        target = (str(out_dir / plan.shards[t.shard].file), t.begin, t.nbytes, t.name, journal)
        spec = merge_spec(plan, t, device)
        if streams(t):
            dsk[key] = Task(key, tasks.stream, [a[:4] for a in loads], spec, target, *after)
        elif fuse:
            dsk[key] = Task(key, tasks.fused, loads, spec, target, *after)
        else:
            dsk.update(_tasks(key, rank, loads, spec, target, after))
        writes[t.shard].append(key)
    finals = []
    for k, shard in enumerate(plan.shards):
        fkey = ("finalize", k)
        dsk[fkey] = Task(fkey, tasks.finalize, str(out_dir / shard.file), shard.size,
                         *[TaskRef(w) for w in writes[k]])
        finals.append(fkey)
    return dsk, [w for k in writes for w in writes[k]], finals


def _merge_key(method: str, rank: int, name: str) -> tuple:
    return (f"merge-{method.replace('_', '-')}", rank, name)  # dask's group: merge-dare-ties


def _done_key(t: TensorPlan, rank: int) -> tuple:
    return _merge_key(t.method, rank, t.name) if streams(t) else ("write", rank, t.name)


def _tasks(wkey: tuple, rank: int, loads: list[tuple], spec: dict, target: tuple,
           after: list[TaskRef] = ()) -> dict:
    """Loads, merge and write of one tensor; with `after`, the loads wait for that write
    (TensorPlan.after)."""
    dsk, refs, name = {}, [], spec["name"]
    for j, a in enumerate(loads):
        lkey = ("load", rank, j, name)
        dsk[lkey] = Task(lkey, tasks.load_after, *after, *a) if after else Task(lkey, tasks.load, *a)
        refs.append(TaskRef(lkey))
    mkey = _merge_key(spec["method"], rank, name)
    dsk[mkey] = Task(mkey, tasks.merge, spec, *refs)
    dsk[wkey] = Task(wkey, tasks.write, *target, TaskRef(mkey))
    return dsk
