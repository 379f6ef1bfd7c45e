"""The engine end to end: config in, a model transformers loads out, through the Dask graph."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergeflow.cli import main
from mergeflow.plan import plan_merge
from mergeflow.spec.config import load_config

LAYER0_UP = "model.layers.0.mlp.up_proj.weight"


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def merge(config: Path, out: Path, *extra: str) -> None:
    assert main(["run", str(config), str(out), "--scheduler", "sync", "--quiet", *extra]) == 0


def test_linear_matches_the_formula(family, write_config, tmp_path):
    cfg = write_config(f"""merge_method: linear
models:
  - model: {family['a']}
    parameters: {{weight: 0.3}}
  - model: {family['b']}
    parameters: {{weight: 0.7}}
dtype: bfloat16
""")
    merge(cfg, tmp_path / "out")
    a, b, out = tensors(family["a"]), tensors(family["b"]), tensors(tmp_path / "out")
    assert set(out) == set(a)
    # mergekit 0.1.5: float32 weights (0.3 -> 0.30000001, 0.7 -> 0.69999999, sum 1.0 in
    # float32), r = (0.3 a + 0.7 b) / 1.0 computed in float32, rounded once to bf16. The second
    # multiply-add may be fused (one rounding, torch's addcmul on FMA CPUs) or not: each
    # element must equal one of the two float32 results, rounded to bf16.
    w0, w1 = torch.tensor(0.3), torch.tensor(0.7)
    assert float(w0 + w1) == 1.0
    for name in (LAYER0_UP, "model.embed_tokens.weight", "model.norm.weight"):
        first = a[name].float() * w0
        unfused = (first + b[name].float() * w1).bfloat16()
        fused = (first.double() + b[name].double() * w1.double()).float().bfloat16()
        assert torch.all((out[name] == unfused) | (out[name] == fused)), name


def test_passthrough_scale_and_frankenmerge(family, write_config, tmp_path):
    cfg = write_config(f"""merge_method: passthrough
slices:
  - sources: [{{model: {family['a']}, layer_range: [0, 2]}}]
  - sources: [{{model: {family['b']}, layer_range: [1, 4]}}]
  - sources:
      - model: {family['a']}
        layer_range: [1, 2]
        parameters: {{scale: [{{filter: o_proj, value: 0.5}}, {{value: 1.0}}]}}
""")
    merge(cfg, tmp_path / "out")
    a, b, out = tensors(family["a"]), tensors(family["b"]), tensors(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 + 3 + 1
    layers = sorted({int(n.split(".")[2]) for n in out if n.startswith("model.layers.")})
    assert layers == [0, 1, 2, 3, 4, 5]
    # output layer -> (source model, source layer)
    origin = {0: (a, 0), 1: (a, 1), 2: (b, 1), 3: (b, 2), 4: (b, 3), 5: (a, 1)}
    for layer, (src, src_layer) in origin.items():
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        assert torch.equal(out[name], src[f"model.layers.{src_layer}.mlp.down_proj.weight"]), name
    # the last slice scales o_proj by 0.5 (exact in bf16) and leaves everything else alone
    o = "self_attn.o_proj.weight"
    assert torch.equal(out[f"model.layers.5.{o}"], a[f"model.layers.1.{o}"] * 0.5)
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # first slice
    assert torch.equal(out["lm_head.weight"], a["lm_head.weight"])  # last slice
    assert torch.equal(out["model.norm.weight"], a["model.norm.weight"])


def test_gradients_and_filters_resolve_per_tensor(family, write_config):
    cfg = write_config(f"""merge_method: linear
models:
  - model: {family['a']}
    parameters:
      weight: [{{filter: self_attn, value: [1.0, 0.0]}}, {{value: 0.25}}]
  - model: {family['b']}
    parameters: {{weight: 1.0}}
parameters: {{normalize: false}}
""")
    plan = plan_merge(load_config(cfg))
    params = {t.name: dict(t.params) for t in plan.tensors}
    # 4 layers: t = k/3 for layer k; self_attn weight = 1 - t
    assert params["model.layers.0.self_attn.q_proj.weight"]["weight"] == (1.0, 1.0)
    assert params["model.layers.1.self_attn.q_proj.weight"]["weight"] == pytest.approx((2 / 3, 1.0))
    assert params["model.layers.3.self_attn.k_proj.weight"]["weight"] == (0.0, 1.0)
    assert params["model.layers.2.mlp.up_proj.weight"]["weight"] == (0.25, 1.0)
    assert params["model.embed_tokens.weight"]["weight"] == (0.25, 1.0)
    assert params["model.norm.weight"]["normalize"] is False


def test_output_loads_in_transformers_and_is_reproducible(family, write_config, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = write_config(f"""merge_method: linear
base_model: {family['base']}
models:
  - model: {family['base']}
    parameters: {{weight: 0.2}}
  - model: {family['a']}
    parameters: {{weight: 0.4}}
  - model: {family['b']}
    parameters: {{weight: 0.4}}
dtype: float32
out_dtype: bfloat16
""")
    merge(cfg, tmp_path / "one")
    merge(cfg, tmp_path / "two", "--out-shard-size", "40KB")
    out = tmp_path / "one"
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("hello world", return_tensors="pt").input_ids
    logits = model(ids).logits
    assert bool(torch.isfinite(logits).all())
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    card = (out / "README.md").read_text()
    assert "tags:\n- merge\n- mergeflow" in card and "library_name: transformers" in card
    assert (out / "mergekit_config.yml").read_text() == cfg.read_text()
    # sharded output: several files + index, same tensors, and transformers loads it too
    sharded = tmp_path / "two"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted({*index["weight_map"].values()})
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    one, two = tensors(out), tensors(sharded)
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert bool(torch.isfinite(AutoModelForCausalLM.from_pretrained(sharded)(ids).logits).all())
    # same config, same inputs: byte-identical files
    merge(cfg, tmp_path / "three")
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "three" / "model.safetensors").read_bytes()


def test_sharded_and_bin_inputs(family, write_config, tmp_path):
    from mergeflow.testing import make_model

    sharded = make_model(tmp_path / "sharded", seed=7, base=family["base"], shards=3)
    binary = tmp_path / "binary"
    shutil.copytree(family["b"], binary)
    (binary / "model.safetensors").unlink()
    torch.save(tensors(family["b"]), binary / "pytorch_model.bin")
    cfg = write_config(f"""merge_method: linear
models:
  - model: {sharded}
    parameters: {{weight: 1.0}}
  - model: {binary}
    parameters: {{weight: 1.0}}
""")
    merge(cfg, tmp_path / "out")
    s, b, out = tensors(sharded), tensors(family["b"]), tensors(tmp_path / "out")
    # no dtype: both stay bf16; weights 1.0; f32 sum rounded once, then / bf16 2.0
    expected = (s[LAYER0_UP].float() + b[LAYER0_UP].float()).bfloat16() / 2
    assert torch.equal(out[LAYER0_UP], expected)


def test_hub_ids_resolve_from_the_cache(family, write_config, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--acme--tiny-a"
    shutil.copytree(family["a"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = write_config(f"""merge_method: linear
models:
  - model: acme/tiny-a
    parameters: {{weight: 1.0}}
  - model: acme/tiny-a@{commit}
    parameters: {{weight: 1.0}}
""")
    plan = plan_merge(load_config(cfg))
    assert [Path(m.path) for m in plan.models] == [repo / "snapshots" / commit] * 2
    bad = write_config("merge_method: linear\nmodels: [{model: acme/missing, parameters: {weight: 1}}]\n",
                       "bad.yml")
    assert main(["validate", str(bad)]) == 2


def test_lora_adapter_is_applied_on_load(family, write_config, tmp_path):
    from safetensors.torch import save_file

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    q = "model.layers.0.self_attn.q_proj.weight"
    w = tensors(family["a"])[q]
    a = torch.full((2, w.shape[1]), 0.5)
    b = torch.full((w.shape[0], 2), 0.25)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b},
              adapter / "adapter_model.safetensors")
    cfg = write_config(f"merge_method: passthrough\nmodels: [{{model: {family['a']}+{adapter}}}]\n")
    merge(cfg, tmp_path / "out")
    out = tensors(tmp_path / "out")
    # scale = alpha / r = 2; (B @ A) = 2 * 0.25 * 0.5 = 0.25 everywhere -> W + 0.5, rounded once
    assert torch.equal(out[q], (w.float() + 0.5).to(w.dtype))
    other = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(out[other], tensors(family["a"])[other])


def test_without_dtype_the_output_is_the_promoted_input_dtype(family, write_config, tmp_path):
    # base bf16, one fine-tune float32: the kernel computes in float32 (promotion), and
    # mergekit 0.1.5 writes that float32 result; only `dtype`/`out_dtype` change it
    from mergeflow.testing import make_model

    wide = make_model(tmp_path / "wide", seed=7, base=family["base"], dtype=torch.float32)
    text = f"""merge_method: ties
base_model: {family['base']}
models:
  - model: {wide}
    parameters: {{weight: 1.0, density: 0.5}}
"""
    plan = plan_merge(load_config(write_config(text)))
    assert {t.out_dtype for t in plan.tensors} == {"float32"}
    plan = plan_merge(load_config(write_config(text + "dtype: bfloat16\n", "bf16.yml")))
    assert {t.out_dtype for t in plan.tensors} == {"bfloat16"}


def test_config_dtype_is_the_dtype_of_most_weights(family, write_config, tmp_path):
    # a frankenmerge of a bf16 model's first layer and a float32 model's other layers keeps
    # each tensor's dtype; config.json names the dtype most of the weights are in
    from mergeflow.testing import make_model

    wide = make_model(tmp_path / "wide", seed=7, base=family["base"], dtype=torch.float32)
    plan = plan_merge(load_config(write_config(f"""merge_method: passthrough
slices:
  - sources: [{{model: {family['base']}, layer_range: [0, 1]}}]
  - sources: [{{model: {wide}, layer_range: [1, 4]}}]
""")))
    dtypes = {t.name: t.out_dtype for t in plan.tensors}
    assert dtypes["model.embed_tokens.weight"] == "bfloat16"
    assert dtypes["model.layers.3.mlp.up_proj.weight"] == "float32"
    assert plan.out_config["torch_dtype"] == "float32"  # not the alphabetically first


def test_cli_turns_on_huge_pages_for_torch_unless_told_otherwise(monkeypatch, capsys):
    # torch reads THP_MEM_ALLOC_ENABLE at its first allocation; the CLI sets it before any
    # torch import (and worker processes inherit it), but never overrides the user's choice
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    assert main(["methods"]) == 0
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    assert main(["methods"]) == 0
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"
