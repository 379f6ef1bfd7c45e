"""The graph of a multi-stage merge (exec/chain.py): keys carry their stage, a stage written
with -I is read only after its shard is finalized, intermediates are placed before the run."""

from __future__ import annotations

from pathlib import Path

from dask.task_spec import Task

from mergeflow.exec import chain as chain_mod
from mergeflow.exec.budget import Budget
from mergeflow.exec.chain import Part, chain_graph, place
from mergeflow.plan.multi import plan_multi
from mergeflow.spec.multi import load_multi

CHAIN = """name: s1
merge_method: ties
base_model: {base}
models:
  - {{model: {a}, parameters: {{weight: 0.6, density: 0.5}}}}
  - {{model: {b}, parameters: {{weight: 0.4, density: 0.4}}}}
---
name: s2
merge_method: slerp
base_model: s1
models: [{{model: s1}}, {{model: {b}}}]
parameters: {{t: 0.5}}
---
merge_method: linear
models: [{{model: s2, parameters: {{weight: 1.0}}}}]
"""


def planned(family, tmp_path: Path, **options):
    config = tmp_path / "chain.yml"
    config.write_text(CHAIN.format(**family))
    return plan_multi(load_multi(config), tmp_path / "work", out_dir=tmp_path / "out", **options)


def deps(task: Task) -> set:
    return {d[0] for d in task.dependencies}


def test_with_intermediate_dir_each_stage_reads_after_the_shards_it_reads_are_finalized(family, tmp_path):
    multi = planned(family, tmp_path, intermediate_dir=tmp_path / "inter")
    parts = [Part(s.plan, s.out_dir, s.name or "") for s in multi.written]
    graph = chain_graph(parts)
    groups = {k[0] for k in graph.dsk}
    assert groups == {"merge-ties-s1", "finalize-s1", "merge-slerp-s2", "finalize-s2", "merge-linear", "finalize"}
    assert all(k[2].startswith(("s1:", "s2:")) for k in graph.dsk if k[0].startswith("merge-") and
               k[0].endswith(("-s1", "-s2")))
    s1 = [t for k, t in graph.dsk.items() if k[0].endswith("-s1") and k[0] != "finalize-s1"]
    s2 = [t for k, t in graph.dsk.items() if k[0] == "merge-slerp-s2"]
    out = [t for k, t in graph.dsk.items() if k[0] == "merge-linear"]
    assert all(deps(t) == set() for t in s1)
    assert all(deps(t) == {"finalize-s1"} and t.func is chain_mod._after for t in s2)
    assert all(deps(t) == {"finalize-s2"} for t in out)
    assert [len(w) for w in graph.writes.values()] == [len(s.plan.tensors) for s in multi.written]
    assert graph.finals == [("finalize-s1", 0), ("finalize-s2", 0), ("finalize", 0)]


def test_without_it_the_stages_are_statistics_tasks_named_after_their_stage(family, tmp_path):
    multi = planned(family, tmp_path)
    (written,) = multi.written
    graph = chain_graph([Part(written.plan, written.out_dir)])
    groups = {k[0] for k in graph.dsk}
    assert groups == {"reduce-ties-s1", "reduce-slerp-s2", "merge-linear", "finalize"}
    assert {k[2].split(":")[0] for k in graph.dsk if k[0].startswith("reduce-")} == {"s1", "s2"}


def test_nothing_gathers_by_token_so_nothing_is_held_or_spilled(family, tmp_path):
    multi = planned(family, tmp_path)
    placement = place(multi.output.plan, multi.output.out_dir, Budget(None, 1))
    assert (placement.held, placement.spilled, placement.spills) == ((), (), ())
    assert placement.plan.tensors == multi.output.plan.tensors
