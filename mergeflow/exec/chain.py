"""One graph for a multi-stage merge: several output directories, intermediates in between.

`chain_graph(parts)` joins the graphs of several plans, each written into its own directory
(the output; with -I every intermediate model; spilled intermediate tensors), into one.
Each part's keys carry its stage's name, so the dashboard groups them by stage:
("merge-ties-s1", rank, "s1:tensor"), ("finalize-s1", shard). A task that reads a shard
another part writes runs after that shard's finalize (synced, so a worker on another
machine sees it).

`place(plan, out_dir, budget)` decides where the intermediate tensors a plan computes are
held. Each is computed where it is read, rows in order, never whole (exec/read.py,
Computed), except for a tensor that gathers its rows by token (a vocabulary alignment):
- a tensor of the plan itself holds them whole when its job fits the budget
  (exec/budget.py makes such a job resident);
- otherwise, and always for an intermediate tensor that gathers (its rows are computed for
  its own consumer, chunk by chunk), the intermediates it reads are *spilled*: computed by a
  part of their own into OUT/.mergeflow/spill/<stage>/ (one shard per tensor) and read from
  there as stored inputs. They go when the run's state does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from dask.task_spec import Task, TaskRef

from mergeflow.dtypes import TORCH_TO_CODE
from mergeflow.exec.budget import Budget, size_job
from mergeflow.exec.graph import build_graph
from mergeflow.exec.jobs import TensorJob, job
from mergeflow.exec.journal import STATE_DIR, journal_path
from mergeflow.plan import Input, MergePlan, Stage, TensorPlan
from mergeflow.plan.shards import plan_shards
from mergeflow.sources.tensors import TensorInfo

SPILL_DIR = "spill"


@dataclass(frozen=True)
class Part:
    """One plan written into one directory; `stage` names its keys ("": the output's keep theirs)."""

    plan: MergePlan
    out_dir: Path
    stage: str = ""
    skip: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Graph:
    dsk: dict
    writes: dict[int, list]  # part index -> its done keys (each returns the bytes it wrote)
    finals: list


def chain_graph(parts: list[Part], *, device: str = "cpu", budget: Budget | None = None) -> Graph:
    dsk: dict = {}
    writes: dict[int, list] = {}
    finals: list = []
    shard_final: dict[str, tuple[int, tuple]] = {}  # shard file -> (part, its finalize key)
    owner: dict = {}
    for k, part in enumerate(parts):
        g, done, fin = build_graph(part.plan, part.out_dir, device=device, skip=part.skip, budget=budget)
        names = {key: _renamed(key, part.stage) for key in g} if part.stage else {key: key for key in g}
        for key, task in g.items():
            new = names[key]
            if new in dsk:
                raise RuntimeError(f"two parts of the multi-stage graph share the key {new}")
            dsk[new] = task.substitute(names, key=new) if part.stage else task
            owner[new] = k
        writes[k] = [names[d] for d in done]
        finals += [names[f] for f in fin]
        out = Path(part.out_dir).resolve()
        for shard, f in zip(part.plan.shards, fin):
            shard_final[str(out / shard.file)] = (k, names[f])
    for key, task in list(dsk.items()):
        after = sorted({f for file in _reads(task) if file in shard_final
                        for p, f in [shard_final[file]] if p != owner[key]})
        if after:
            dsk[key] = Task(key, _after, task.func, len(after), *[TaskRef(f) for f in after], *task.args,
                            **task.kwargs)
    return Graph(dsk, writes, finals)


def _renamed(key: tuple, stage: str) -> tuple:
    if key[0] == "finalize":
        return (f"finalize-{stage}", *key[1:])
    return (f"{key[0]}-{stage}", key[1], f"{stage}:{key[2]}", *key[3:])


def _after(func, n: int, *args, **kwargs):
    """Run func(*args[n:]): the first n arguments are results it waits for (written shards)."""
    return func(*args[n:], **kwargs)


def _reads(task: Task) -> set[str]:
    """The input files the jobs of `task` read (those of the intermediates they compute too)."""
    files: set[str] = set()
    todo = [a for a in task.args if isinstance(a, TensorJob)]
    while todo:
        j = todo.pop()
        for s in j.sources:
            if s.producer is not None:
                todo.append(s.producer)
            else:
                files.add(s.file)
    return files


# ----------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class Placement:
    plan: MergePlan  # spilled intermediates read from their shards
    spills: tuple[Part, ...]  # one per stage with spilled tensors, into OUT/.mergeflow/spill/<stage>
    held: tuple[tuple[str, tuple[str, ...]], ...]  # (tensor, the intermediates it holds whole)
    spilled: tuple[tuple[str, int], ...]  # (stage:tensor, bytes)


@dataclass
class _Walk:
    out_dir: Path
    budget: Budget
    device: str
    need: dict[tuple[str, str], Stage] = field(default_factory=dict)  # spilled: (stage, tensor) -> it
    held: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def visit(self, t: TensorPlan, owner: MergePlan, top: bool, label: str) -> None:
        computed = [i for i in t.all_inputs() if i.stage is not None]
        if t.vocab is not None and computed:
            if top and self.fits(owner, t):
                self.held[label] = tuple(f"{i.stage.name}:{i.stage.tensor.name}" for i in computed)
            else:
                for i in computed:
                    self.need.setdefault((i.stage.name, i.stage.tensor.name), i.stage)
        for i in computed:
            if (i.stage.name, i.stage.tensor.name) not in self.need:
                self.visit(i.stage.tensor, i.stage.plan, False, f"{i.stage.name}:{i.stage.tensor.name}")

    def fits(self, owner: MergePlan, t: TensorPlan) -> bool:
        j = job(owner, t, self.out_dir, str(journal_path(self.out_dir)), self.device)
        return size_job(j, self.budget).resident


def place(plan: MergePlan, out_dir: str | Path, budget: Budget, device: str = "cpu") -> Placement:
    out_dir = Path(out_dir).resolve()
    walk = _Walk(out_dir, budget, device)
    while True:  # until no spill adds another (a spilled tensor runs as a tensor of its own part)
        before = len(walk.need)
        walk.held.clear()
        for t in plan.tensors:
            walk.visit(t, plan, True, t.name)
        for (name, _), stage in list(walk.need.items()):
            walk.visit(stage.tensor, stage.plan, True, f"{name}:{stage.tensor.name}")
        if len(walk.need) == before:
            break
    root = out_dir / STATE_DIR / SPILL_DIR
    stored, layouts = {}, {}
    for name in dict.fromkeys(n for n, _ in walk.need):
        stage_plan = next(s.plan for (n, _), s in walk.need.items() if n == name)
        placed, shards = plan_shards([s.tensor for (n, _), s in walk.need.items() if n == name], 1)
        layouts[name] = (stage_plan, placed, shards)
        for t in placed:
            file = str(root / name / shards[t.shard].file)
            stored[(name, t.name)] = TensorInfo(t.name, file, TORCH_TO_CODE[t.out_dtype], tuple(t.shape), t.begin, t.end)
    fix = _Fix(stored)
    spills = tuple(Part(dataclasses.replace(p, tensors=tuple(fix(t) for t in placed), shards=tuple(shards)),
                        root / name, name) for name, (p, placed, shards) in layouts.items())
    out = dataclasses.replace(plan, tensors=tuple(fix(t) for t in plan.tensors))
    return Placement(out, spills, tuple(walk.held.items()),
                     tuple((f"{n}:{t}", stored[(n, t)].nbytes) for n, t in walk.need))


@dataclass
class _Fix:
    """Tensors with every spilled intermediate input read from its spill shard."""

    stored: dict[tuple[str, str], TensorInfo]

    def __call__(self, t: TensorPlan) -> TensorPlan:
        return dataclasses.replace(t, inputs=tuple(self.swap(i) for i in t.inputs), base=self.swap(t.base))

    def swap(self, inp: Input | None) -> Input | None:
        if inp is None or inp.stage is None:
            return inp
        info = self.stored.get((inp.stage.name, inp.stage.tensor.name))
        if info is not None:
            return Input(inp.model, info, inp.crop)
        return dataclasses.replace(inp, stage=Stage(inp.stage.name, inp.stage.plan, self(inp.stage.tensor)))
