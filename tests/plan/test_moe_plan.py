"""Planning a MoE: the output architecture chosen as mergekit-moe chooses, every output tensor
as parts at fixed offsets, copies for the engine and writes of their own, problems found."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergeflow.errors import MergeflowError
from mergeflow.plan.moe import plan_moe
from mergeflow.plan.moe_arch import choose_arch
from mergeflow.plan.shards import read_header
from mergeflow.spec.moe import parse_moe_config
from mergeflow.testing import make_model

ROOT = Path(__file__).resolve().parents[2]
EX = ROOT / "examples" / "models"
TWO = "experts:\n  - {source_model: a, positive_prompts: [x]}\n  - {source_model: b, positive_prompts: [y]}\n"


def cfg(text: str):
    return parse_moe_config(text, "moe.yml")


def examples(extra: str = "", mode: str = "cheap_embed", experts: str = "") -> str:
    experts = experts or "".join(f"  - {{source_model: {EX / n}, positive_prompts: [{n}]}}\n"
                                 for n in ("instruct", "code", "math"))
    return f"base_model: {EX / 'base'}\ngate_mode: {mode}\nexperts:\n{experts}{extra}"


@pytest.mark.parametrize("text, types, chosen, warned", [
    (f"base_model: m\n{TWO}", ["llama"] * 3, "Mixtral", False),
    (f"base_model: m\n{TWO}", ["mistral"] * 3, "Mixtral", False),
    (f"base_model: m\n{TWO}shared_experts:\n  - {{source_model: s, positive_prompts: [z]}}\n",
     ["qwen2"] * 4, "Qwen MoE", False),
    (f"base_model: m\n{TWO}shared_experts:\n  - {{source_model: s}}\n", ["llama"] * 4, "DeepSeek MoE", False),
    (f"base_model: m\ngate_mode: random\n{TWO}shared_experts:\n  - {{source_model: s}}\n", ["llama"] * 4,
     "DeepSeek MoE", True),
    (f"base_model: m\narchitecture: qwen\n{TWO}shared_experts:\n  - {{source_model: s, positive_prompts: [z]}}\n",
     ["llama"] * 4, "Qwen MoE", False),
    (f"base_model: m\n{TWO}", ["qwen3"] * 3, "Qwen3 MoE", False),
    (f"base_model: m\narchitecture: DEEPSEEK\n{TWO}", ["llama"] * 3, "DeepSeek MoE", False),
])
def test_the_architecture_is_chosen_as_mergekit_chooses(text, types, chosen, warned):
    arch, warnings = choose_arch(cfg(text), types, allow_crimes=False)
    assert arch.name == chosen
    assert bool(warnings) == warned
    if warned:
        assert warnings == ["DeepSeek MoE and Qwen MoE can hold this MoE; writing DeepSeek MoE, the first "
                            "(set `architecture:` to choose)"]


def test_no_architecture_says_why_each_was_refused():
    with pytest.raises(MergeflowError) as err:
        choose_arch(cfg(f"base_model: m\n{TWO}"), ["llama", "mistral", "llama"], allow_crimes=False)
    assert str(err.value) == (
        "moe.yml: no output architecture can hold this MoE:\n"
        "  - Mixtral: Mixtral needs every model to have the same architecture (model types: llama, mistral; "
        "--allow-crimes mixes them)\n"
        "  - DeepSeek MoE: DeepSeek MoE needs every model to have the same architecture (model types: llama, "
        "mistral; --allow-crimes mixes them)\n"
        "  - Qwen MoE: Qwen MoE needs exactly one shared expert\n"
        "  - Qwen3 MoE: Qwen3 MoE takes qwen3 models, not llama, mistral")
    assert choose_arch(cfg(f"base_model: m\n{TWO}"), ["llama", "mistral", "llama"], allow_crimes=True)[0].name == "Mixtral"
    with pytest.raises(MergeflowError, match=r"moe.yml:2:1: no output architecture matches `architecture: "
                                             r"phi`; mergeflow moe writes Mixtral, DeepSeek MoE, Qwen MoE, Qwen3 MoE"):
        choose_arch(cfg(f"base_model: m\narchitecture: phi\n{TWO}"), ["llama"] * 3, allow_crimes=False)


def test_mixtral_parts_tile_the_fused_tensors_and_the_shard():
    plan = plan_moe(cfg(examples()))
    assert plan.architecture == "Mixtral" and len(plan.shards) == 1
    shard = plan.shards[0]
    header = json.loads(shard.header[8:])
    assert header["model.layers.0.mlp.experts.gate_up_proj"]["shape"] == [3, 256, 64]
    assert header["model.layers.0.mlp.experts.down_proj"]["shape"] == [3, 64, 128]
    assert header["model.layers.3.mlp.gate.weight"] == {**header["model.layers.3.mlp.gate.weight"],
                                                        "dtype": "BF16", "shape": [3, 64]}
    spans = sorted((p.begin, p.end) for p in (*plan.copies, *plan.writes))
    assert spans[0][0] == len(shard.header) and spans[-1][1] == shard.size
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, no overlap
    parts = {t.name: t for t in plan.copies}
    start = len(shard.header) + header["model.layers.1.mlp.experts.gate_up_proj"]["data_offsets"][0]
    for k, (expert, proj) in enumerate((e, p) for e in ("instruct", "code", "math") for p in ("gate", "up")):
        part = parts[f"model.layers.1.mlp.experts.gate_up_proj[{k}]"]
        assert part.begin == start + k * 128 * 64 * 2 and part.shape == (128, 64)
        assert part.inputs[0].tensor.file == str(EX / expert / "model.safetensors")
        assert part.inputs[0].tensor.name == f"model.layers.1.mlp.{proj}_proj.weight"
    assert set(shard.tensors) == set(plan.parts)
    assert {w.kind for w in plan.writes} == {"gate"} and plan.gates.embed.tensor.name == "model.embed_tokens.weight"


def test_residual_scale_and_noise():
    experts = (f"  - {{source_model: {EX / 'instruct'}, positive_prompts: [a], residual_scale: 0.5}}\n"
               f"  - {{source_model: {EX / 'code'}, positive_prompts: [b], noise_scale: 0.02, residual_scale: 0.7}}\n")
    plan = plan_moe(cfg(examples(experts=experts)))
    scales = {t.name: dict(t.params)["scale"][0] for t in plan.copies if ".mlp." in t.name and "layers.0." in t.name}
    assert scales == {"model.layers.0.mlp.experts.down_proj[0]": 0.5,
                      "model.layers.0.mlp.experts.gate_up_proj[0]": None,
                      "model.layers.0.mlp.experts.gate_up_proj[1]": None}
    noisy = {w.name: (w.noise, w.scale) for w in plan.writes if w.kind == "noise" and "layers.0." in w.name}
    assert noisy == {"model.layers.0.mlp.experts.down_proj[1]": (0.02, 0.7),
                     "model.layers.0.mlp.experts.gate_up_proj[2]": (0.02, None),
                     "model.layers.0.mlp.experts.gate_up_proj[3]": (0.02, None)}


def test_the_same_model_as_every_expert_needs_the_flag():
    same = "".join(f"  - {{source_model: {EX / 'code'}, positive_prompts: [{p}]}}\n" for p in ("a", "b"))
    with pytest.raises(MergeflowError, match=r"moe.yml:3:1: every expert is .*/code, which makes a model that "
                                             r"costs more and computes the same; pass --i-understand-this-is-"
                                             r"not-useful-without-training if you will train it"):
        plan_moe(cfg(examples(experts=same)))
    assert plan_moe(cfg(examples(experts=same)), allow_all_same=True).architecture == "Mixtral"


def test_experts_need_the_bases_layers_and_shapes(tmp_path):
    wide = make_model(tmp_path / "wide", seed=1, intermediate=96)
    short = make_model(tmp_path / "short", seed=2, layers=2)
    experts = "".join(f"  - {{source_model: {m}, positive_prompts: [{m.name}]}}\n" for m in (wide, short))
    with pytest.raises(MergeflowError) as err:
        plan_moe(cfg(examples(experts=experts)))
    msg = str(err.value)
    assert msg.startswith("moe.yml: 18 problem(s) found while planning the MoE (no tensor was read):\n")
    assert (f"  - moe.yml:4:6: model.layers.0.mlp.gate_proj.weight of {wide} has shape [96, 64], the base's "
            "[128, 64]; every expert needs the base's MLP shapes") in msg
    assert f"  - moe.yml:5:6: model {short} has no tensor model.layers.2.mlp.gate_proj.weight" in msg


def test_deepseek_names_and_config():
    plan = plan_moe(cfg(examples(f"shared_experts:\n  - source_model: {EX / 'base'}\n")))
    assert plan.architecture == "DeepSeek MoE"
    names = {n for s in plan.shards for n in read_header_names(s)}
    assert {"model.layers.2.mlp.experts.2.down_proj.weight", "model.layers.2.mlp.shared_experts.up_proj.weight",
            "model.layers.2.mlp.gate.weight"} <= names
    assert not any("shared_expert_gate" in n for n in names)
    out = json.loads(plan.out_config)
    assert (out["model_type"], out["n_routed_experts"], out["n_shared_experts"], out["num_experts_per_tok"]) == \
        ("deepseek", 3, 1, 2)
    assert out["auto_map"]["AutoModelForCausalLM"].startswith("deepseek-ai/deepseek-moe-16b-base--")


def read_header_names(shard) -> list[str]:
    return [k for k in json.loads(shard.header[8:]) if k != "__metadata__"]


def test_dtype_and_shards(tmp_path):
    plan = plan_moe(cfg(examples("dtype: float32\n")), out_shard_size=200_000)
    assert len(plan.shards) > 2
    assert {t.out_dtype for t in plan.copies} == {w.out_dtype for w in plan.writes} == {"float32"}
    fused = [t.shard for t in plan.copies if t.name.startswith("model.layers.2.mlp.experts.gate_up_proj[")]
    assert len(fused) == 6 and len(set(fused)) == 1  # a tensor's parts share its shard
    assert json.loads(plan.out_config)["dtype"] == "float32"
    bf16 = plan_moe(cfg(examples()))  # no dtype: the base's config dtype
    assert {t.out_dtype for t in bf16.copies} == {"bfloat16"}
    written = tmp_path / "one.safetensors"
    written.write_bytes(bf16.shards[0].header)
    assert set(read_header(written)) - {"__metadata__"} == set(read_header_names(bf16.shards[0]))
