"""Every tensor runs as its method's passes over row chunks (exec/tasks.py): what the graph
holds, what a task holds, that a reader reads only its rows, and that a merge in many small
chunks, re-read every pass, or split into row blocks writes the same bytes as one chunk, on
every scheduler."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeflow.errors import MergeflowError
from mergeflow.exec import budget
from mergeflow.exec.graph import build_graph, jobs
from mergeflow.exec.jobs import Source, Target, TensorJob
from mergeflow.exec.options import RunOptions
from mergeflow.exec.read import Stored, load_tensor
from mergeflow.exec.tasks import run_tensor
from mergeflow.methods import REGISTRY, passes
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
    "slerp": """merge_method: slerp
base_model: {base}
models:
  - model: {a}
parameters: {{t: 0.5}}
dtype: bfloat16
""",
    "model_stock": """merge_method: model_stock
base_model: {base}
models:
  - model: {a}
  - model: {b}
dtype: bfloat16
""",
    "arcee_fusion": """merge_method: arcee_fusion
base_model: {base}
models:
  - model: {a}
dtype: bfloat16
""",
    "nuslerp": """merge_method: nuslerp
base_model: {base}
models:
  - {{model: {a}, parameters: {{weight: 0.4}}}}
  - {{model: {b}, parameters: {{weight: 0.6}}}}
dtype: bfloat16
""",
    "multislerp": """merge_method: multislerp
base_model: {base}
models:
  - {{model: {a}, parameters: {{weight: 0.4}}}}
  - {{model: {b}, parameters: {{weight: 0.6}}}}
dtype: bfloat16
""",
    "karcher": """merge_method: karcher
models:
  - model: {base}
  - model: {a}
  - model: {b}
parameters: {{max_iter: 4}}
dtype: bfloat16
""",
    "sce": """merge_method: sce
base_model: {base}
models:
  - model: {a}
  - model: {b}
parameters: {{select_topk: 0.5}}
dtype: bfloat16
""",
    "ram": """merge_method: ram
base_model: {base}
models:
  - model: {a}
  - model: {b}
dtype: bfloat16
""",
    "ramplus_tl": """merge_method: ramplus_tl
base_model: {base}
models:
  - model: {a}
  - model: {b}
dtype: bfloat16
""",
    "nearswap": """merge_method: nearswap
base_model: {base}
models:
  - model: {a}
parameters: {{t: 0.004}}
dtype: bfloat16
""",
    "passthrough": """merge_method: passthrough
models:
  - model: {a}
    parameters:
      scale: [{{filter: up_proj, value: 0.9}}, {{value: 1.0}}]
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
METHODS = sorted(REGISTRY)  # every method


def plan_for(family, write_config, method: str, dtype: str = "bfloat16", extra: str = "") -> MergePlan:
    text = CONFIGS.get(method, TASK_VECTORS).format(method=method, dtype=dtype, **family)
    if dtype != "bfloat16":
        text = text.replace("dtype: bfloat16", f"dtype: {dtype}")
    return plan_merge(load_config(write_config(text + extra, f"{method}.yml")))


def shard_bytes(out: Path) -> bytes:
    return (out / "model.safetensors").read_bytes()


@pytest.fixture(autouse=True)
def small_segments(monkeypatch):
    """Segments of 1024 elements (16 rows of 64), so the tiny family's tensors have several
    and can be split into row blocks; every run of a test, reference included, uses them."""
    monkeypatch.setattr(passes, "SEGMENT", 1024)


def small_chunks(monkeypatch, blocks: bool = True) -> None:
    """1000-element chunks, inputs re-read every pass, tensors over 8192 elements in blocks."""
    monkeypatch.setattr(budget, "CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(budget, "RESIDENT_WITHOUT_LIMIT", 0)
    if blocks:
        monkeypatch.setattr(budget, "BLOCK_ELEMENTS", 8192)


def test_every_tensor_runs_in_row_chunks(family, write_config, monkeypatch, tmp_path):
    """No load or write tasks: a tensor is one task; with blocks, its passes per block."""
    plan = plan_for(family, write_config, "ties")
    dsk, done, finals = build_graph(plan, tmp_path)
    assert {k[0] for k in dsk} == {"merge-ties", "finalize"} and len(done) == len(plan.tensors)
    monkeypatch.setattr(budget, "BLOCK_ELEMENTS", 8192)  # 384 x 64: 3 blocks of 128 rows
    dsk, done, _ = build_graph(plan, tmp_path)
    assert {k[0] for k in dsk} == {"merge-ties", "reduce-ties", "finalize"} and len(done) == len(plan.tensors)
    embed = [k for k in dsk if k[0] != "finalize" and k[2] == EMBED]
    # bf16 selection: one pass (3 blocks + a combine), then 3 applies and the commit
    assert sorted(k[3:] for k in embed if k[0] == "reduce-ties") == [(0,), (0, 0), (0, 1), (0, 2)]
    assert sorted(k[3:] for k in embed if k[0] == "merge-ties") == [(), (0,), (1,), (2,)]


def test_working_set_by_hand(family, write_config, tmp_path):
    """linear, 384 x 64 bf16 from two models, compute dtype bf16: a bf16 read buffer per input
    (2 x 2 bytes), a float32 accumulator plus three bf16 temporaries (4 + 3 x 2): 14 bytes per
    element of one chunk (the whole tensor: 24,576 elements < 500k). In float32 each input is
    also cast: 2 x (2 + 4), plus 4 + 3 x 4. With 1000-element chunks: 15 rows, 960 elements.
    ties (base, a, b) keeps its inputs (3 x 49,152 bytes) and a mask per model (2 x 24,576), and
    per element adds 8 bytes per model for keys and masks: 3 x 2 + 4 + 3 x 2 + 2 x 8."""
    embed = next(j for j in jobs(plan_for(family, write_config, "linear"), tmp_path) if j.name == EMBED)
    assert budget.working_set(embed) == 384 * 64 * 14
    f32 = next(j for j in jobs(plan_for(family, write_config, "linear", "float32"), tmp_path) if j.name == EMBED)
    assert budget.working_set(f32) == 384 * 64 * (2 * (2 + 4) + 4 + 3 * 4)
    import dataclasses

    assert budget.working_set(dataclasses.replace(embed, chunk=1000)) == 960 * 14
    assert budget.working_set(dataclasses.replace(embed, chunk=10)) == 64 * 14  # one row at a time
    ties = next(j for j in jobs(plan_for(family, write_config, "ties"), tmp_path) if j.name == EMBED)
    assert ties.resident
    assert budget.working_set(ties) == 3 * 384 * 64 * 2 + 2 * 384 * 64 + 384 * 64 * (3 * 2 + 4 + 3 * 2 + 8 * 2)


def test_stored_reads_only_its_rows(family, tmp_path):
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
    with Stored(Source("a", str(copy), EMBED, "BF16", (384, 64), info.begin), resident=False) as stored:
        assert torch.equal(stored.rows(10, 20, buffer), expected[10:20])
        assert torch.isnan(stored.rows(9, 10, buffer).float()).all()
        # rows in any order, read run by run
        assert torch.equal(stored.gather(__import__("numpy").array([12, 10, 11, 19]), buffer),
                           expected[[12, 10, 11, 19]])


def test_stored_rows_of_a_bin_checkpoint_and_of_a_0d_tensor(tmp_path):
    table = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    torch.save({"t": table, "s": torch.tensor(2.5)}, tmp_path / "pytorch_model.bin")
    save_file({"s": torch.tensor(2.5)}, tmp_path / "scalar.safetensors")
    buffer = torch.empty(64, dtype=torch.uint8)
    with Stored(Source("m", str(tmp_path / "pytorch_model.bin"), "t", "F32", (4, 3)), resident=False) as s:
        assert torch.equal(s.rows(1, 3, buffer), torch.tensor([[3.0, 4, 5], [6, 7, 8]]))
    begin = 8 + int.from_bytes((tmp_path / "scalar.safetensors").read_bytes()[:8], "little")
    for file, start in (("pytorch_model.bin", 0), ("scalar.safetensors", begin)):
        with Stored(Source("m", str(tmp_path / file), "s", "F32", (), start), resident=False) as s:
            got = s.rows(0, 1, buffer)
            assert got.shape == (1,) and float(got[0]) == 2.5  # a 0-d tensor is one row of one element


@pytest.mark.parametrize("method", METHODS)
def test_chunked_blocked_merge_equals_one_chunk(family, write_config, tmp_path, monkeypatch, method):
    """1000-element chunks, inputs re-read every pass, the 384 x 64 tensors in 3 row blocks as
    separate tasks (methods that allow it): the bytes of one resident chunk, on the sync and the
    distributed scheduler (and dask's threads, for a few)."""
    plan = plan_for(family, write_config, method)
    run_merge(plan, tmp_path / "whole", RunOptions(scheduler="sync", quiet=True))
    small_chunks(monkeypatch)
    for scheduler in ("sync", "distributed") + (("threads",) if method in ("ties", "dare_ties", "linear") else ()):
        run_merge(plan, tmp_path / scheduler, RunOptions(scheduler=scheduler, quiet=True,
                                                         dashboard_address="127.0.0.1:0"))
        assert shard_bytes(tmp_path / scheduler) == shard_bytes(tmp_path / "whole"), scheduler
    assert load_file(tmp_path / "sync" / "model.safetensors").keys() == load_file(
        tmp_path / "whole" / "model.safetensors").keys()


def test_chunked_merge_of_cropped_and_cast_inputs(family, write_config, tmp_path, monkeypatch):
    """Embeddings of 392 and 384 rows without a tokenizer setting are cut to the common 384
    rows (--unsafe-truncate-embeddings), and bf16 inputs are cast to float32 chunk by chunk:
    the same bytes as one chunk."""
    padded = make_model(tmp_path / "padded", seed=3, base=family["base"], extra_vocab_rows=8)
    text = CONFIGS["linear"].format(a=padded, b=family["b"]).replace("dtype: bfloat16", "dtype: float32")
    plan = plan_merge(load_config(write_config(text)), unsafe_truncate_embeddings=True)
    assert any("cut to 384x64" in w for w in plan.warnings)
    embed = next(t for t in plan.tensors if t.name == EMBED)
    assert embed.inputs[0].crop == (384, 64)
    run_merge(plan, tmp_path / "whole", RunOptions(scheduler="sync", quiet=True))
    small_chunks(monkeypatch)
    run_merge(plan, tmp_path / "chunked", RunOptions(scheduler="sync", quiet=True))
    assert shard_bytes(tmp_path / "chunked") == shard_bytes(tmp_path / "whole")


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_chunked_merge_of_vocabulary_aligned_rows(family, write_config, tmp_path, monkeypatch, method):
    """tokenizer_source: union re-indexes embedding rows by token: gathered chunk by chunk (and
    block by block) they give the bytes of one chunk."""
    plan = plan_for(family, write_config, method, extra="tokenizer_source: union\n")
    assert any(t.vocab is not None for t in plan.tensors)
    run_merge(plan, tmp_path / "whole", RunOptions(scheduler="sync", quiet=True))
    small_chunks(monkeypatch)
    run_merge(plan, tmp_path / "chunked", RunOptions(scheduler="sync", quiet=True))
    assert shard_bytes(tmp_path / "chunked") == shard_bytes(tmp_path / "whole")


def _job(name: str, sources: list[Source], shape, out: Path, method="linear",
         params=(("weight", (0.5, 0.25)), ("normalize", True)), chunk=640) -> TensorJob:
    nbytes = 4 * int(torch.tensor(shape).prod()) if shape else 4
    return TensorJob(name, method, params, tuple(sources), len(sources), False, "float32", "float32", shape, 0,
                     Target(str(out), 4, nbytes, str(out.with_name("journal"))), chunk=chunk)


def _source(path: Path, name: str) -> Source:
    info = read_tensor_index(path.parent, "m")[name] if path.name.endswith(".safetensors") else None
    return Source(path.stem, str(path), name, info.dtype, tuple(info.shape), info.begin)


def test_nan_in_several_chunks_is_counted_whole_names_the_input_and_is_not_recorded(tmp_path):
    """NaN in rows 0, 20 and 127 of a 128 x 64 input, 10-row chunks: all 3 x 64 values are
    counted, the message names the input that holds them, and the tensor is not recorded."""
    (tmp_path / "bad").mkdir()
    (tmp_path / "good").mkdir()
    x = torch.ones(128, 64)
    x[[0, 20, 127]] = float("nan")
    save_file({UP: x}, tmp_path / "bad" / "model.safetensors")
    save_file({UP: torch.ones(128, 64)}, tmp_path / "good" / "model.safetensors")
    out = tmp_path / "out.bin"
    out.write_bytes(bytes(4 + 128 * 64 * 4))
    job = _job(UP, [_source(tmp_path / d / "model.safetensors", UP) for d in ("bad", "good")], (128, 64), out)
    with pytest.raises(MergeflowError, match=f"merge of {UP} \\(linear\\) produced 192 NaN/Inf values: "
                                             f"input model model tensor {UP} already holds 192 NaN/Inf"):
        run_tensor(job)
    assert not list(tmp_path.glob("journal*"))


def test_a_0d_and_an_empty_tensor(tmp_path):
    """Edge shapes: a 0-d tensor is one row (0.5 x 3 + 0.25 x 2 = 2, normalized by 0.75:
    2.6666667 in float32), an empty one writes nothing and is still recorded as done."""
    for m, value in (("a", 3.0), ("b", 2.0)):
        (tmp_path / m).mkdir()
        save_file({"s": torch.tensor(value), "e": torch.zeros(0, 4)}, tmp_path / m / "model.safetensors")
    out = tmp_path / "out.bin"
    out.write_bytes(bytes(8))
    for name, shape in (("s", ()), ("e", (0, 4))):
        job = _job(name, [_source(tmp_path / m / "model.safetensors", name) for m in "ab"], shape, out)
        assert run_tensor(job) == (4 if name == "s" else 0)
    got = torch.frombuffer(bytearray(out.read_bytes()), dtype=torch.float32)
    assert got[0] == 0 and abs(float(got[1]) - 2 / 0.75) < 1e-6
    done = "".join(p.read_text() for p in tmp_path.glob("journal*"))  # this process's part
    assert "done s\n" in done and "done e\n" in done
