"""Row blocks (memory.py): they tile a tensor's rows and bytes exactly, a block load reads
only its rows, and a row-blocked merge writes the same bytes as the whole-tensor merge."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from dask.local import get_sync
from safetensors.torch import load_file

from mergeflow import memory, tasks
from mergeflow.config import load_config
from mergeflow.graph import build_graph
from mergeflow.io.models import load_tensor, read_tensor_index
from mergeflow.journal import journal_path
from mergeflow.methods import REGISTRY
from mergeflow.plan import MergePlan, plan_merge
from mergeflow.run import RunOptions, run_merge

EMBED = "model.embed_tokens.weight"  # 384 x 64 bf16 in the tiny family


CONFIGS = {
    "linear": """merge_method: linear
models:
  - {{model: {a}, parameters: {{weight: 0.3}}}}
  - {{model: {b}, parameters: {{weight: 0.7}}}}
dtype: bfloat16
""",
    "nearswap": """merge_method: nearswap
base_model: {base}
models:
  - {{model: {a}}}
parameters: {{t: 0.004}}
dtype: bfloat16
""",
}
TASK_VECTORS = """merge_method: {method}
base_model: {base}
models:
  - {{model: {a}, parameters: {{weight: 0.6, density: 0.5}}}}
  - {{model: {b}, parameters: {{weight: 0.5, density: 0.5}}}}
dtype: bfloat16
"""


def plan_for(family, write_config, method: str) -> MergePlan:
    text = CONFIGS.get(method, TASK_VECTORS).format(method=method, **family)
    return plan_merge(load_config(write_config(text, f"{method}.yml")))


def blocked(plan: MergePlan, pieces: int = 3) -> MergePlan:
    """Every splittable tensor in about `pieces` row blocks, whatever its size."""
    tensors = []
    for t in plan.tensors:
        if memory.can_split(t) and t.shape[0] >= pieces:
            t = dataclasses.replace(t, blocks=memory.row_blocks(t, memory.working_set(t) // pieces + 1))
        tensors.append(t)
    return dataclasses.replace(plan, tensors=tuple(tensors))


def shard_bytes(out: Path) -> bytes:
    return (out / "model.safetensors").read_bytes()


def test_blocks_tile_rows_and_bytes(family, write_config):
    plan = plan_for(family, write_config, "linear")
    embed = next(t for t in plan.tensors if t.name == EMBED)
    row = 64 * 2  # bytes per output row: 64 bf16 columns
    assert memory.block_bytes(embed, (0, 384)) == (embed.begin, embed.end)
    assert memory.block_bytes(embed, (3, 5)) == (embed.begin + 3 * row, embed.begin + 5 * row)
    for t in plan.tensors:
        for per_task in (memory.working_set(t) // 7 + 1, memory.working_set(t) // 2 + 1, 10**12):
            blocks = memory.row_blocks(t, per_task)
            assert blocks[0][0] == 0 and blocks[-1][1] == t.shape[0]
            assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))  # contiguous, no overlap
            assert all(r1 > r0 and memory.working_set(t, r1 - r0) <= per_task for r0, r1 in blocks)
            spans = [memory.block_bytes(t, b) for b in blocks]
            assert spans[0][0] == t.begin and spans[-1][1] == t.end
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert len(memory.row_blocks(t, 10**12)) == 1


def test_working_set_by_hand(family, write_config):
    """384 x 64 bf16 from two models, compute dtype bf16: the inputs are used as mapped (no
    anonymous copy); a float32 accumulator plus three bf16 temporaries, 4 + 3 x 2 = 10 bytes
    per element. In float32 the inputs are copies: 2 x 4 bytes, plus 4 + 3 x 4."""
    plan = plan_for(family, write_config, "linear")
    embed = next(t for t in plan.tensors if t.name == EMBED)
    assert memory.working_set(embed) == 384 * 64 * 10
    assert memory.working_set(embed, 3) == 3 * 64 * 10
    f32 = dataclasses.replace(embed, compute_dtype="float32", out_dtype="float32")
    assert memory.working_set(f32) == 384 * 64 * (2 * 4 + 4 + 3 * 4)
    estimate = memory.estimate(plan, memory.Budget(None, 2))
    sizes = sorted((memory.working_set(t) for t in plan.tensors), reverse=True)
    assert estimate.peak == memory.BASELINE + sum(sizes[:3])
    assert estimate.largest_bytes == sizes[0] and estimate.blocked == 0


@pytest.mark.parametrize("method, split", [("linear", True), ("task_arithmetic", True), ("nearswap", True),
                                           ("ties", False), ("dare_ties", False), ("slerp", False)])
def test_only_row_separable_methods_are_split(family, write_config, method, split):
    if method == "slerp":
        text = f"merge_method: slerp\nbase_model: {family['base']}\nmodels:\n  - model: {family['a']}\n" \
               "parameters: {t: 0.5}\ndtype: bfloat16\n"
        plan = plan_merge(load_config(write_config(text, "slerp.yml")))
    else:
        plan = plan_for(family, write_config, method)
    assert all(memory.can_split(t) == split for t in plan.tensors if t.shape[0] > 1), method
    # the tiny family fits any real budget: nothing is split, and the plan is untouched
    fitted = memory.fit_budget(plan, memory.Budget(memory.BASELINE + 3 * memory.MIN_TASK, 2))
    assert fitted == plan and memory.fit_budget(plan, memory.Budget(None, 2)) is plan


def test_block_load_reads_only_its_rows(family, tmp_path):
    """Bytes outside the block are overwritten with NaNs in a copy: the block is unaffected."""
    src = family["a"] / "model.safetensors"
    info = read_tensor_index(family["a"], "a")[EMBED]
    whole = load_tensor(str(src), EMBED)
    copy = tmp_path / "model.safetensors"
    shutil.copyfile(src, copy)
    begin, end = info.begin + 10 * 128, info.begin + 20 * 128  # rows 10..19
    data = bytearray(copy.read_bytes())
    data[info.begin:begin] = b"\xff" * (begin - info.begin)
    data[end:info.end] = b"\xff" * (info.end - end)
    copy.write_bytes(bytes(data))
    assert torch.equal(load_tensor(str(copy), EMBED, (10, 20)), whole[10:20])
    assert torch.isnan(load_tensor(str(copy), EMBED, (9, 10)).float()).all()
    # through the task, with a column crop and a dtype: rows first, then the crop
    got = tasks.load(str(copy), EMBED, (384, 32), "float32", None, (10, 20))
    assert torch.equal(got, whole[10:20, :32].float())


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "nearswap"])
def test_blocked_merge_equals_whole_merge(family, write_config, tmp_path, method):
    plan = plan_for(family, write_config, method)
    run_merge(plan, tmp_path / "whole", RunOptions(scheduler="sync", quiet=True))
    split = blocked(plan)
    assert sum(len(t.blocks) for t in split.tensors) > 2 * len(plan.tensors)
    for scheduler in ("sync", "threads"):
        run_merge(split, tmp_path / scheduler, RunOptions(scheduler=scheduler, quiet=True))
        assert shard_bytes(tmp_path / scheduler) == shard_bytes(tmp_path / "whole"), scheduler
    assert load_file(tmp_path / "sync" / "model.safetensors").keys() == load_file(
        tmp_path / "whole" / "model.safetensors").keys()


def test_fused_blocked_graph_writes_the_same_bytes(family, write_config, tmp_path):
    """The graph process workers get (fuse=True: a task per block), run on a zeroed copy."""
    plan = plan_for(family, write_config, "linear")
    out = tmp_path / "out"
    run_merge(plan, out, RunOptions(scheduler="sync", quiet=True))
    expected = shard_bytes(out)
    header = len(plan.shards[0].header)
    (out / "model.safetensors").write_bytes(expected[:header] + bytes(len(expected) - header))
    journal_path(out).parent.mkdir(exist_ok=True)
    journal_path(out).write_text("")
    dsk, writes, finals = build_graph(blocked(plan), out, fuse=True)
    assert any(len(k) == 4 and k[0] == "write" for k in dsk)  # block tasks exist
    get_sync(dsk, finals + writes)
    assert shard_bytes(out) == expected
    done = "".join(p.read_text() for p in journal_path(out).parent.glob("journal*")).split("\n")  # + parts
    assert sorted(x.removeprefix("done ") for x in done if x) == sorted(t.name for t in plan.tensors)


def test_chained_tensors_wait_and_write_the_same_bytes(family, write_config, tmp_path):
    """TensorPlan.after (tensors too large to be in memory together, memory.lanes): each
    tensor's loads depend on the previous tensor's write; the bytes do not change."""
    plan = plan_for(family, write_config, "ties")
    run_merge(plan, tmp_path / "free", RunOptions(scheduler="sync", quiet=True))
    names = [t.name for t in plan.tensors]
    chained = dataclasses.replace(plan, tensors=tuple(
        dataclasses.replace(t, after=names[i - 1] if i else None) for i, t in enumerate(plan.tensors)))
    dsk, _, _ = build_graph(chained, tmp_path / "graph")
    second = ("load", len(names) - 2, 0, names[1])
    assert ("write", len(names) - 1, names[0]) in dsk[second].dependencies
    for scheduler in ("threads", "distributed"):
        run_merge(chained, tmp_path / scheduler, RunOptions(scheduler=scheduler, quiet=True,
                                                             dashboard_address="127.0.0.1:0"))
        assert shard_bytes(tmp_path / scheduler) == shard_bytes(tmp_path / "free"), scheduler


def test_lanes_keep_whole_tensors_within_the_limit(family, write_config, monkeypatch):
    monkeypatch.setattr(memory, "MIN_TASK", 0)  # the tiny family's tensors are far below it
    plan = plan_for(family, write_config, "ties")
    biggest = max(memory.working_set(t) for t in plan.tensors)
    # a limit that holds one of the largest tensors beside the process, not two
    budget = memory.Budget(memory.BASELINE + biggest + biggest // 2, 2)
    assert memory.lanes(plan, budget) == 1
    fitted = memory.fit_budget(plan, budget)
    heavy = [t for t in fitted.tensors if memory.working_set(t) > budget.per_task]
    assert heavy and not any(t.blocks for t in fitted.tensors)  # ties: never row blocks
    assert heavy[0].after is None and [t.after for t in heavy[1:]] == [t.name for t in heavy[:-1]]
    assert all(t.after is None for t in fitted.tensors if t not in heavy)
    assert fitted.fingerprint == plan.fingerprint
    assert memory.lanes(plan, memory.Budget(memory.BASELINE + 2 * biggest, 2)) == 2
    assert memory.lanes(plan, memory.Budget(None, 2)) == 2
    warning = memory.estimate(plan, budget).warnings()[0]
    assert "cannot be split into row blocks" in warning and "1 at a time" in warning


@pytest.mark.parametrize("method, params", [
    ("linear", (("weight", (0.3, 0.5, 0.2)), ("normalize", True))),
    ("task_arithmetic", (("weight", (0.7, -0.4)), ("lambda", 0.9))),
    ("nearswap", (("t", 0.001),)),
    ("ram", ()),
])
def test_merge_in_row_chunks_equals_one_kernel_call(monkeypatch, method, params):
    # 300 x 64 bf16 inputs in blocks of 1000 elements: 15 rows, the last block short
    monkeypatch.setattr(tasks, "CHUNK_ELEMENTS", 1000)
    g = torch.Generator().manual_seed(7)
    m = REGISTRY[method]
    models = {"linear": 3, "nearswap": 1}.get(method, 2)  # besides the base (linear: none)
    base = None if method == "linear" else (torch.randn(300, 64, generator=g) * 0.02).bfloat16()
    xs = [(torch.randn(300, 64, generator=g) * (0.02 if base is None else 1e-3)).bfloat16()
          + (0 if base is None else base) for _ in range(models)]
    spec = {"name": "w", "method": method, "params": params, "inputs": len(xs), "base": base is not None,
            "out_dtype": "bfloat16", "seed": 0, "device": "cpu", "vocab": None}
    kwargs = {**m.preset, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in params}}
    expected = m.kernel(xs, base, **kwargs)
    got = tasks.merge(spec, *xs, *([] if base is None else [base]))
    assert got.shape == (300, 64)
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))
