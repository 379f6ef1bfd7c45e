"""Translate a MergePlan into a Dask graph: {key: Task}. Nothing else happens here.

Keys name the dashboard groups: ("load", rank, model, tensor), ("merge-<method>", rank,
tensor), ("write", rank, tensor), ("finalize", shard). `rank` counts down in output file
order, because dask.order takes the largest key first among ties. With `fuse=True` each
tensor's loads, merge and write are one task (keyed like its write), so no tensor crosses
the network between process workers. A tensor planned in row blocks (TensorPlan.blocks) has
these tasks per block, keyed with the block number last, and a ("write", rank, tensor) task
that records it in the journal once every block is written. A tensor with TensorPlan.after
loads only once that tensor is written (tensors too large to be in memory together).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dask.task_spec import Task, TaskRef

from mergeflow import tasks
from mergeflow.journal import journal_path
from mergeflow.memory import block_bytes
from mergeflow.plan import MergePlan, TensorPlan


def merge_spec(plan: MergePlan, t: TensorPlan, device: str = "cpu") -> dict[str, Any]:
    return {"name": t.name, "method": t.method, "params": t.params, "inputs": len(t.inputs),
            "base": t.base is not None, "out_dtype": t.out_dtype, "seed": plan.seed, "device": device,
            "vocab": t.vocab}


def build_graph(plan: MergePlan, out_dir: str | Path, *, device: str = "cpu",
                skip: frozenset[str] | set[str] = frozenset(), fuse: bool = False) -> tuple[dict, list, list]:
    """Return (graph, write keys, finalize keys); tensors named in `skip` are already written."""
    out_dir = Path(out_dir).resolve()
    journal = str(journal_path(out_dir))
    dsk: dict = {}
    writes: dict[int, list] = {k: [] for k in range(len(plan.shards))}
    n = len(plan.tensors)
    ranks = {t.name: n - 1 - i for i, t in enumerate(plan.tensors)}
    for i, t in enumerate(plan.tensors):
        if t.name in skip:
            continue
        rank = n - 1 - i
        after = [TaskRef(("write", ranks[t.after], t.after))] if t.after and t.after not in skip else []
        loads = [(inp.tensor.file, inp.tensor.name, inp.crop, t.compute_dtype, inp.tensor.lora)
                 for inp in t.all_inputs()]
        target = (str(out_dir / plan.shards[t.shard].file), t.begin, t.nbytes, t.name, journal)
        wkey = ("write", rank, t.name)
        spec = merge_spec(plan, t, device)
        if t.blocks:
            dsk.update(_block_tasks(t, rank, loads, spec, target, fuse))
        elif fuse:
            dsk[wkey] = Task(wkey, tasks.fused, loads, spec, target, *after)
        else:
            dsk.update(_tasks(wkey, rank, (), loads, spec, target, after))
        writes[t.shard].append(wkey)
    finals = []
    for k, shard in enumerate(plan.shards):
        fkey = ("finalize", k)
        dsk[fkey] = Task(fkey, tasks.finalize, str(out_dir / shard.file), shard.size,
                         *[TaskRef(w) for w in writes[k]])
        finals.append(fkey)
    return dsk, [w for k in writes for w in writes[k]], finals


def _tasks(wkey: tuple, rank: int, block: tuple, loads: list[tuple], spec: dict, target: tuple,
           after: list[TaskRef] = ()) -> dict:
    """Loads, merge and write of one tensor (block: () ) or one row block ((b,), rows last);
    with `after`, the loads wait for that write (TensorPlan.after)."""
    dsk, refs, name = {}, [], spec["name"]
    for j, a in enumerate(loads):
        lkey = ("load", rank, j, name, *block)
        dsk[lkey] = Task(lkey, tasks.load_after, *after, *a) if after else Task(lkey, tasks.load, *a)
        refs.append(TaskRef(lkey))
    mkey = (f"merge-{spec['method'].replace('_', '-')}", rank, name, *block)  # dask's group: merge-dare-ties
    dsk[mkey] = Task(mkey, tasks.merge, spec, *refs)
    dsk[wkey] = Task(wkey, tasks.write, *target, TaskRef(mkey))
    return dsk


def _block_tasks(t: TensorPlan, rank: int, loads: list[tuple], spec: dict, target: tuple,
                 fuse: bool) -> dict:
    """A tensor merged in row blocks (memory.py): per block, its rows of every input are
    loaded, merged and written at the block's own offset (journal ""), then `commit` (keyed
    like a whole tensor's write) records the tensor. Block numbers count down, like ranks."""
    dsk, writes = {}, []
    for k, rows in enumerate(t.blocks):
        b = len(t.blocks) - 1 - k
        begin, end = block_bytes(t, rows)
        block_loads = [(*a, rows) for a in loads]
        block_target = (target[0], begin, end - begin, t.name, "")
        wkey = ("write", rank, t.name, b)
        if fuse:
            dsk[wkey] = Task(wkey, tasks.fused, block_loads, spec, block_target)
        else:
            dsk.update(_tasks(wkey, rank, (b,), block_loads, spec, block_target))
        writes.append(TaskRef(wkey))
    ckey = ("write", rank, t.name)
    dsk[ckey] = Task(ckey, tasks.commit, target[4], t.name, *writes)
    return dsk
