"""Translate a MergePlan into a Dask graph: {key: Task}. Nothing else happens here.

Every tensor runs its method's passes over row chunks (exec/tasks.py). A tensor is one task,
keyed ("merge-<method>", rank, tensor); a tensor split into row blocks (exec/budget.py) is a
("reduce-<method>", rank, tensor, pass, block) task per pass and block, a ("reduce-<method>",
rank, tensor, pass) task combining each pass's partials, a ("merge-<method>", rank, tensor,
block) apply task per block, and a ("merge-<method>", rank, tensor) task that commits the
tensor. Then ("finalize", shard) per shard. In a multi-stage merge an input may be an earlier
stage's tensor, computed where it is read: its statistics come from a ("reduce-<method>-<stage>",
rank, "stage:tensor") task, once per such tensor. The key's first part names the dashboard group;
`rank` counts down in output file order, because dask.order takes the largest key first among
ties (reading inputs in file order is faster on cold disks).
"""

from __future__ import annotations

from pathlib import Path

from dask.task_spec import Task, TaskRef

from mergeflow.exec import tasks
from mergeflow.exec.budget import Budget, size_job
from mergeflow.exec.jobs import TensorJob, job
from mergeflow.exec.journal import journal_path
from mergeflow.plan import MergePlan


def jobs(plan: MergePlan, out_dir: str | Path, *, device: str = "cpu", budget: Budget | None = None,
         skip: frozenset[str] | set[str] = frozenset()) -> list[TensorJob]:
    """Every tensor's job (sized for `budget`), in output order; tensors in `skip` left out."""
    out_dir = Path(out_dir).resolve()
    journal = str(journal_path(out_dir))
    budget = budget or Budget(None, 1)
    return [size_job(job(plan, t, out_dir, journal, device), budget) for t in plan.tensors if t.name not in skip]


def build_graph(plan: MergePlan, out_dir: str | Path, *, device: str = "cpu",
                skip: frozenset[str] | set[str] = frozenset(), budget: Budget | None = None) -> tuple[dict, list, list]:
    """Return (graph, done keys, finalize keys): a done key is the task that finishes one
    tensor and returns the bytes it wrote; tensors named in `skip` are already written."""
    dsk: dict = {}
    n = len(plan.tensors)
    rank = {t.name: n - 1 - i for i, t in enumerate(plan.tensors)}
    shard = {t.name: t.shard for t in plan.tensors}
    writes: dict[int, list] = {k: [] for k in range(len(plan.shards))}
    made: dict[str, tuple] = {}  # intermediate tensors (multi-stage merges): their statistics tasks
    for j in jobs(plan, out_dir, device=device, budget=budget, skip=skip):
        key = _key("merge", j, rank[j.name])
        if j.blocks:
            dsk.update(_split(j, rank[j.name], key))
        else:
            produced = _produced(dsk, made, j, rank[j.name], budget or Budget(None, 1))
            dsk[key] = Task(key, tasks.run_tensor, j, *produced)
        writes[shard[j.name]].append(key)
    out_dir = Path(out_dir).resolve()
    finals = []
    for k, s in enumerate(plan.shards):
        fkey = ("finalize", k)
        dsk[fkey] = Task(fkey, tasks.finalize, str(out_dir / s.file), s.size, *[TaskRef(w) for w in writes[k]])
        finals.append(fkey)
    return dsk, [w for k in writes for w in writes[k]], finals


def _key(kind: str, j: TensorJob, rank: int, *rest) -> tuple:
    group = f"{kind}-{j.method.replace('_', '-')}" + (f"-{j.stage}" if j.stage else "")  # merge-dare-ties
    return (group, rank, j.label, *rest)


def _produced(dsk: dict, made: dict[str, tuple], j: TensorJob, rank: int, budget: Budget) -> list:
    """Per source of `j`: a reference to the statistics task of the intermediate tensor it
    is (added once, with those of the tensors that one reads; `made`: label -> key), or None."""
    refs = []
    for s in j.sources:
        if s.producer is None:
            refs.append(None)
            continue
        if s.producer.label not in made:
            producer = size_job(s.producer, budget)
            key = made[s.producer.label] = _key("reduce", producer, rank)
            dsk[key] = Task(key, tasks.statistics, producer, *_produced(dsk, made, producer, rank, budget))
        refs.append(TaskRef(made[s.producer.label]))
    return refs


def _split(j: TensorJob, rank: int, done: tuple) -> dict:
    """The tasks of a tensor split into row blocks: its passes block by block, then the apply."""
    dsk: dict = {}
    stats = None
    for k in range(len(j.program().passes)):
        parts = []
        for b in range(len(j.blocks)):
            rkey = _key("reduce", j, rank, k, b)
            dsk[rkey] = Task(rkey, tasks.reduce_block, j, k, b, TaskRef(stats) if stats else {})
            parts.append(TaskRef(rkey))
        ckey = _key("reduce", j, rank, k)
        dsk[ckey] = Task(ckey, tasks.combine, j, k, TaskRef(stats) if stats else None, *parts)
        stats = ckey
    applied = []
    for b in range(len(j.blocks)):
        akey = _key("merge", j, rank, b)
        dsk[akey] = Task(akey, tasks.apply_block, j, b, TaskRef(stats) if stats else None)
        applied.append(TaskRef(akey))
    dsk[done] = Task(done, tasks.commit, j, *applied)
    return dsk
