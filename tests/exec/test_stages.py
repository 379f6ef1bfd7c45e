"""Intermediate tensors of a multi-stage merge, computed where they are read (exec/read.py,
Computed): a chain whose second stage reads the first stage's tensors from the graph writes
the same bytes as running the first stage to disk and the second on its output, and nothing
of the first stage is written."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mergeflow.exec import budget
from mergeflow.exec.graph import build_graph
from mergeflow.exec.options import RunOptions
from mergeflow.output.merge import run_merge
from mergeflow.plan import MergePlan, Stage, plan_merge
from mergeflow.spec.config import parse_config

FIRST = """merge_method: {method}
base_model: {base}
models:
  - {{model: {a}, parameters: {{weight: 0.6, density: 0.5}}}}
  - {{model: {b}, parameters: {{weight: 0.4, density: 0.4}}}}
dtype: bfloat16
"""
SECOND = """merge_method: {method}
base_model: {base}
models:
  - model: {first}
parameters: {{t: 0.3}}
dtype: bfloat16
"""


def chained(second: MergePlan, first: MergePlan, first_dir: Path, name: str = "s1") -> MergePlan:
    """`second` with every input read from `first_dir` replaced by `first`'s tensor of that name."""
    by_name = {t.name: t for t in first.tensors}
    model = next(i for i, m in enumerate(second.models) if Path(m.path) == first_dir.resolve())

    def swap(inp):
        if inp is None or inp.model != model:
            return inp
        return dataclasses.replace(inp, stage=Stage(name, first, by_name[inp.tensor.name]))
    return dataclasses.replace(second, tensors=tuple(
        dataclasses.replace(t, inputs=tuple(swap(i) for i in t.inputs), base=swap(t.base)) for t in second.tensors))


def bytes_of(out: Path) -> bytes:
    return (out / "model.safetensors").read_bytes()


@pytest.mark.parametrize("first_method, second_method", [("ties", "slerp"), ("dare_ties", "nearswap"),
                                                         ("linear", "ties")])
def test_a_chain_computes_the_first_stage_in_the_graph(family, tmp_path, first_method, second_method):
    first_text = FIRST.format(method=first_method, **family)
    if first_method == "linear":
        first_text = first_text.replace(f"base_model: {family['base']}\n", "").replace(", density: 0.5", "") \
            .replace(", density: 0.4", "")
    first = plan_merge(parse_config(first_text))
    run_merge(first, tmp_path / "s1", RunOptions(scheduler="sync", quiet=True))
    text = SECOND.format(method=second_method, base=family["base"], first=tmp_path / "s1")
    if second_method == "ties":
        text = text.replace("parameters: {t: 0.3}\n", "parameters: {weight: 1.0, density: 0.5}\n")
    elif second_method == "nearswap":
        text = text.replace("{t: 0.3}", "{t: 0.001}")
    second = plan_merge(parse_config(text))
    run_merge(second, tmp_path / "two-runs", RunOptions(scheduler="sync", quiet=True))
    chain = chained(second, first, tmp_path / "s1")
    dsk, _, _ = build_graph(chain, tmp_path / "graph")
    groups = {k[0] for k in dsk}
    assert f"reduce-{first_method.replace('_', '-')}-s1" in groups or first_method == "linear"
    assert all(isinstance(k[2], str) for k in dsk if k[0].endswith("-s1") and k[2].startswith("s1:"))
    for scheduler in ("sync", "distributed"):
        out = tmp_path / scheduler
        run_merge(chain, out, RunOptions(scheduler=scheduler, quiet=True, dashboard_address="127.0.0.1:0"))
        assert bytes_of(out) == bytes_of(tmp_path / "two-runs"), scheduler
        assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]


def test_a_chain_re_reads_or_holds_the_intermediate_alike(family, tmp_path, monkeypatch):
    """The consumer (ties: one selection pass) reads the computed tensor twice, in 1000-element
    chunks, or holds it whole: the same bytes."""
    first = plan_merge(parse_config(FIRST.format(method="ties", **family)))
    run_merge(first, tmp_path / "s1", RunOptions(scheduler="sync", quiet=True))
    text = SECOND.format(method="ties", base=family["base"], first=tmp_path / "s1").replace(
        "parameters: {t: 0.3}\n", "parameters: {weight: 1.0, density: 0.5}\n")
    chain = chained(plan_merge(parse_config(text)), first, tmp_path / "s1")
    run_merge(chain, tmp_path / "held", RunOptions(scheduler="sync", quiet=True))
    monkeypatch.setattr(budget, "CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(budget, "RESIDENT_WITHOUT_LIMIT", 0)
    run_merge(chain, tmp_path / "streamed", RunOptions(scheduler="sync", quiet=True))
    assert bytes_of(tmp_path / "streamed") == bytes_of(tmp_path / "held")
