"""Streamed tensors (memory.streams, tasks.stream): which tensors stream, what a streamed
task holds, that a row reader reads only its rows, and that a merge streamed in many small
row chunks writes the same bytes as the whole-tensor merge, on every scheduler and graph."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from dask.local import get_sync
from safetensors.torch import load_file, save_file

from mergeflow.errors import MergeflowError
from mergeflow.exec import budget as memory
from mergeflow.exec import graph, tasks
from mergeflow.exec.graph import build_graph
from mergeflow.exec.journal import journal_path
from mergeflow.exec.read import RowReader, load_tensor
from mergeflow.exec.run import RunOptions
from mergeflow.output.merge import run_merge
from mergeflow.plan import MergePlan, plan_merge
from mergeflow.sources.models import read_tensor_index
from mergeflow.spec.config import load_config
from mergeflow.testing import make_model

EMBED = "model.embed_tokens.weight"  # 384 x 64 bf16 in the tiny family
UP = "model.layers.1.mlp.up_proj.weight"  # 128 x 64


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
    "ram": """merge_method: ram
base_model: {base}
models:
  - {{model: {a}}}
  - {{model: {b}}}
dtype: bfloat16
""",
    "passthrough": """merge_method: passthrough
models:
  - model: {a}
    parameters:
      scale: [{{filter: up_proj, value: 0.9}}, {{value: 1.0}}]
dtype: bfloat16
""",
    "slerp": """merge_method: slerp
base_model: {base}
models:
  - model: {a}
parameters: {{t: 0.5}}
dtype: bfloat16
""",
}
TASK_VECTORS = """merge_method: {method}
base_model: {base}
models:
  - {{model: {a}, parameters: {{weight: 0.6, density: 0.5}}}}
  - {{model: {b}, parameters: {{weight: 0.5, density: 0.5}}}}
dtype: {dtype}
"""
STREAMED = ["linear", "task_arithmetic", "nearswap", "ram", "passthrough"]


def plan_for(family, write_config, method: str, dtype: str = "bfloat16") -> MergePlan:
    text = CONFIGS.get(method, TASK_VECTORS).format(method=method, dtype=dtype, **family)
    if dtype != "bfloat16":
        text = text.replace("dtype: bfloat16", f"dtype: {dtype}")
    return plan_merge(load_config(write_config(text, f"{method}.yml")))


def shard_bytes(out: Path) -> bytes:
    return (out / "model.safetensors").read_bytes()


def whole(monkeypatch) -> None:
    """Build graphs as if no tensor streamed: loads, merge and write tasks for every tensor."""
    monkeypatch.setattr(graph, "streams", lambda t: False)


@pytest.mark.parametrize("method, streamed", [(m, True) for m in STREAMED] + [
    ("ties", False), ("dare_ties", False), ("dare_linear", False), ("breadcrumbs", False), ("slerp", False)])
def test_only_row_separable_methods_stream(family, write_config, method, streamed):
    plan = plan_for(family, write_config, method)
    assert all(memory.streams(t) == streamed for t in plan.tensors), method
    estimate = memory.estimate(plan, memory.Budget(None, 2))
    assert estimate.streamed == (len(plan.tensors) if streamed else 0)
    assert (f"{estimate.streamed} tensor(s) streamed in row chunks" in estimate.text()) == streamed


def test_vocabulary_and_lora_tensors_do_not_stream(family, write_config):
    """Aligning rows to a new vocabulary and applying a LoRA delta need the whole tensor."""
    plan = plan_merge(load_config(write_config(CONFIGS["linear"].format(**family)
                                               + "tokenizer_source: union\n", "union.yml")))
    vocab = [t for t in plan.tensors if t.vocab is not None]
    assert vocab and not any(memory.streams(t) for t in vocab)
    assert all(memory.streams(t) for t in plan.tensors if t.vocab is None)
    embed = next(t for t in plan.tensors if t.name == EMBED)
    lora = dataclasses.replace(embed.inputs[0].tensor, lora=object())
    with_lora = dataclasses.replace(embed, vocab=None, inputs=(dataclasses.replace(embed.inputs[0], tensor=lora),
                                                               *embed.inputs[1:]))
    assert not memory.streams(with_lora)


def test_working_set_by_hand(family, write_config, monkeypatch):
    """Streamed, 384 x 64 bf16 from two models, compute dtype bf16: a bf16 read buffer per
    input (2 x 2 bytes), a float32 accumulator plus three bf16 temporaries (4 + 3 x 2): 14
    bytes per element of one chunk. In float32 each input is also cast: 2 x (2 + 4), plus
    4 + 3 x 4. The whole tensor is one chunk here; with 1000-element chunks, 1000 elements.
    ties is never streamed: its inputs are used as mapped, temporaries 4 + 3 x 2, plus 8
    bytes per input for sort indices and masks, over the whole tensor."""
    embed = next(t for t in plan_for(family, write_config, "linear").tensors if t.name == EMBED)
    assert memory.working_set(embed) == 384 * 64 * 14
    f32 = next(t for t in plan_for(family, write_config, "linear", "float32").tensors if t.name == EMBED)
    assert memory.working_set(f32) == 384 * 64 * (2 * (2 + 4) + 4 + 3 * 4)
    monkeypatch.setattr(memory, "CHUNK_ELEMENTS", 1000)
    assert memory.working_set(embed) == 1000 * 14
    monkeypatch.setattr(memory, "CHUNK_ELEMENTS", 10)  # less than a row: one row at a time
    assert memory.working_set(embed) == 64 * 14
    ties = next(t for t in plan_for(family, write_config, "ties").tensors if t.name == EMBED)
    assert memory.working_set(ties) == 384 * 64 * (4 + 3 * 2 + 8 * 2)


def test_row_reader_reads_only_its_rows(family, tmp_path):
    """Bytes outside rows 10..19 are overwritten with NaNs in a copy: those rows are unaffected."""
    src = family["a"] / "model.safetensors"
    info = read_tensor_index(family["a"], "a")[EMBED]
    expected = load_tensor(str(src), EMBED)
    copy = tmp_path / "model.safetensors"
    shutil.copyfile(src, copy)
    begin, end = info.begin + 10 * 128, info.begin + 20 * 128  # 128 bytes a row
    data = bytearray(copy.read_bytes())
    data[info.begin:begin] = b"\xff" * (begin - info.begin)
    data[end:info.end] = b"\xff" * (info.end - end)
    copy.write_bytes(bytes(data))
    buffer = torch.empty(20 * 128, dtype=torch.uint8)
    with RowReader(str(copy), EMBED) as reader:
        assert reader.row_bytes() == 128
        assert torch.equal(reader.rows(10, 20, buffer), expected[10:20])
        assert torch.isnan(reader.rows(9, 10, buffer).float()).all()


def test_row_reader_of_a_bin_checkpoint_and_of_a_0d_tensor(tmp_path):
    table = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    torch.save({"t": table, "s": torch.tensor(2.5)}, tmp_path / "pytorch_model.bin")
    save_file({"s": torch.tensor(2.5)}, tmp_path / "scalar.safetensors")
    buffer = torch.empty(64, dtype=torch.uint8)
    with RowReader(str(tmp_path / "pytorch_model.bin"), "t") as reader:
        assert torch.equal(reader.rows(1, 3, buffer), torch.tensor([[3.0, 4, 5], [6, 7, 8]]))
    for file in ("pytorch_model.bin", "scalar.safetensors"):
        with RowReader(str(tmp_path / file), "s") as reader:
            got = reader.rows(0, 1, buffer)
            assert got.shape == () and float(got) == 2.5


@pytest.mark.parametrize("method", STREAMED)
def test_streamed_merge_equals_whole_merge(family, write_config, tmp_path, monkeypatch, method):
    """1000-element chunks: every tensor of the tiny family takes several, most with a short
    last one (384 x 64 in 16-row chunks, 1-D norms in one)."""
    plan = plan_for(family, write_config, method)
    with monkeypatch.context() as m:
        whole(m)
        run_merge(plan, tmp_path / "whole", RunOptions(scheduler="sync", quiet=True))
    monkeypatch.setattr(tasks, "CHUNK_ELEMENTS", 1000)
    for scheduler in ("sync", "threads", "distributed"):
        run_merge(plan, tmp_path / scheduler, RunOptions(scheduler=scheduler, quiet=True,
                                                         dashboard_address="127.0.0.1:0"))
        assert shard_bytes(tmp_path / scheduler) == shard_bytes(tmp_path / "whole"), scheduler
    assert load_file(tmp_path / "sync" / "model.safetensors").keys() == load_file(
        tmp_path / "whole" / "model.safetensors").keys()


def test_streamed_merge_of_cropped_and_cast_inputs(family, write_config, tmp_path, monkeypatch):
    """Embeddings of 392 and 384 rows without a tokenizer setting are cut to the common 384
    rows (--unsafe-truncate-embeddings), and bf16 inputs are cast to float32 chunk by chunk: the same bytes as whole."""
    padded = make_model(tmp_path / "padded", seed=3, base=family["base"], extra_vocab_rows=8)
    text = CONFIGS["linear"].format(a=padded, b=family["b"]).replace("dtype: bfloat16", "dtype: float32")
    plan = plan_merge(load_config(write_config(text)), unsafe_truncate_embeddings=True)
    assert any("cut to 384x64" in w for w in plan.warnings)
    embed = next(t for t in plan.tensors if t.name == EMBED)
    assert embed.inputs[0].crop == (384, 64) and memory.streams(embed)
    with monkeypatch.context() as m:
        whole(m)
        run_merge(plan, tmp_path / "whole", RunOptions(scheduler="sync", quiet=True))
    monkeypatch.setattr(tasks, "CHUNK_ELEMENTS", 1000)
    run_merge(plan, tmp_path / "streamed", RunOptions(scheduler="sync", quiet=True))
    assert shard_bytes(tmp_path / "streamed") == shard_bytes(tmp_path / "whole")


def test_fused_graph_streams_and_writes_the_same_bytes(family, write_config, tmp_path, monkeypatch):
    """The graph process workers get (fuse=True): a streamed tensor is still one task, keyed
    like its merge (dashboard group merge-linear); run on a zeroed copy of the output."""
    plan = plan_for(family, write_config, "linear")
    out = tmp_path / "out"
    run_merge(plan, out, RunOptions(scheduler="sync", quiet=True))
    expected = shard_bytes(out)
    header = len(plan.shards[0].header)
    (out / "model.safetensors").write_bytes(expected[:header] + bytes(len(expected) - header))
    journal_path(out).parent.mkdir(exist_ok=True)
    journal_path(out).write_text("")
    monkeypatch.setattr(tasks, "CHUNK_ELEMENTS", 1000)
    dsk, writes, finals = build_graph(plan, out, fuse=True)
    assert {k[0] for k in dsk} == {"merge-linear", "finalize"}
    assert sorted(writes) == sorted(k for k in dsk if k[0] == "merge-linear")
    get_sync(dsk, finals + writes)
    assert shard_bytes(out) == expected
    done = "".join(p.read_text() for p in journal_path(out).parent.glob("journal*")).split("\n")  # + parts
    assert sorted(x.removeprefix("done ") for x in done if x) == sorted(t.name for t in plan.tensors)


def test_nan_in_several_chunks_is_counted_whole_and_not_recorded(family, write_config, tmp_path, monkeypatch):
    """NaN in rows 0, 20 and 127 of a 128 x 64 input, 10-row chunks: all 3 x 64 values are
    counted, and the tensor is not recorded as done."""
    plan = plan_for(family, write_config, "linear")
    up = next(t for t in plan.tensors if t.name == UP)
    bad = tmp_path / "bad.safetensors"
    x = load_tensor(up.inputs[0].tensor.file, UP).clone()
    x[[0, 20, 127]] = float("nan")
    save_file({UP: x}, bad)
    out, journal = tmp_path / "out.bin", tmp_path / "journal"
    out.write_bytes(bytes(up.end))
    monkeypatch.setattr(tasks, "CHUNK_ELEMENTS", 640)
    loads = [(str(bad), UP, None, "bfloat16"), (up.inputs[1].tensor.file, UP, None, "bfloat16")]
    with pytest.raises(MergeflowError, match=f"merge of {UP} \\(linear\\) produced 192 NaN/Inf values"):
        tasks.stream(loads, graph.merge_spec(plan, up), (str(out), up.begin, up.nbytes, UP, str(journal)))
    assert not list(tmp_path.glob("journal*"))


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
    assert heavy and heavy[0].after is None and [t.after for t in heavy[1:]] == [t.name for t in heavy[:-1]]
    assert all(t.after is None for t in fitted.tensors if t not in heavy)
    assert fitted.fingerprint == plan.fingerprint
    assert memory.lanes(plan, memory.Budget(memory.BASELINE + 2 * biggest, 2)) == 2
    assert memory.lanes(plan, memory.Budget(None, 2)) == 2
    warning = memory.estimate(plan, budget).warnings()[0]
    assert "cannot be streamed in row chunks" in warning and "1 at a time" in warning
    # a budget that holds three of the largest: nothing is chained, and the plan is unchanged
    assert memory.fit_budget(plan, memory.Budget(memory.BASELINE + 3 * biggest, 2)) == plan


def test_stream_of_a_0d_and_an_empty_tensor(tmp_path):
    """Edge shapes: a 0-d tensor is one row (0.5 x 3 + 0.25 x 2 = 2, normalized by 0.75:
    2.6666667 in float32), an empty one writes nothing and is still recorded as done."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"s": torch.tensor(3.0), "e": torch.zeros(0, 4)}, a)
    save_file({"s": torch.tensor(2.0), "e": torch.zeros(0, 4)}, b)
    out, journal = tmp_path / "out.bin", tmp_path / "journal"
    out.write_bytes(bytes(8))
    for name, shape, nbytes in (("s", (), 4), ("e", (0, 4), 0)):
        spec = {"name": name, "method": "linear", "params": (("weight", (0.5, 0.25)), ("normalize", True)),
                "inputs": 2, "base": False, "out_dtype": "float32", "seed": 0, "device": "cpu",
                "vocab": None, "shape": shape}
        loads = [(str(a), name, None, "float32"), (str(b), name, None, "float32")]
        assert tasks.stream(loads, spec, (str(out), 4, nbytes, name, str(journal))) == nbytes
    got = torch.frombuffer(bytearray(out.read_bytes()), dtype=torch.float32)
    assert got[0] == 0 and got[1] == torch.tensor(2.0 / 0.75)
    done = "".join(p.read_text() for p in tmp_path.glob("journal*"))
    assert done == "done s\ndone e\n"
