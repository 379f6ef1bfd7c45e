"""Planning a LoRA extraction: mergekit-extract-lora's sorting of modules, ranks, the file layout
and adapter_config.json, from headers alone."""

from __future__ import annotations

import json
import struct

import pytest

from mergeflow.errors import MergeflowError
from mergeflow.plan.extract_lora import (
    EMBEDDING,
    LORA,
    SAVE,
    ExtractOptions,
    adapter_config,
    layout,
    plan_extraction,
)
from mergeflow.testing import make_model

P = "base_model.model."
LAYER = [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]


def plan(family, **options):
    return plan_extraction(family["a"], family["base"], ExtractOptions(**options))


def kinds(p) -> dict[str, str]:
    return {m.name: m.kind for m in p.modules}


def test_default_sorting_is_mergekits(family):
    """Linear layers become LoRAs, embeddings and norms are saved whole, in the order mergekit
    0.1.5 lists them for this model (its adapter_config.json of examples/models)."""
    p = plan(family)
    expected = {"model.embed_tokens": SAVE, "lm_head": SAVE, "model.norm": SAVE}
    for i in range(4):
        expected |= {f"model.layers.{i}.{s}": LORA for s in LAYER}
        expected |= {f"model.layers.{i}.{n}": SAVE for n in ("input_layernorm", "post_attention_layernorm")}
    assert kinds(p) == expected
    assert p.modules_to_save == ("embed_tokens", "input_layernorm", "post_attention_layernorm", "norm", "lm_head")
    assert p.ranks["model.layers.0.self_attn.q_proj"] == 64  # 64 x 64: the smaller side under 128
    assert p.ranks["model.layers.0.self_attn.k_proj"] == 32  # 32 x 64
    assert set(plan(family, max_rank=8).ranks.values()) == {8}


def test_the_adapter_file_is_laid_out_from_the_headers(family):
    p = plan(family, max_rank=8)
    t = {x.name: x for x in p.tensors}
    q, down = P + "model.layers.0.self_attn.q_proj", P + "model.layers.0.mlp.down_proj"
    assert t[q + ".lora_A.weight"].shape == (8, 64) and t[q + ".lora_B.weight"].shape == (64, 8)
    assert t[down + ".lora_A.weight"].shape == (8, 128) and t[down + ".lora_B.weight"].shape == (64, 8)
    assert t[P + "model.embed_tokens.weight"].source.name == "model.embed_tokens.weight"
    assert t[P + "model.norm.weight"].shape == (64,)
    assert {x.dtype for x in p.tensors} == {"bfloat16"}
    assert len(p.tensors) == 28 * 2 + 11  # A and B of 28 LoRAs; 2 embeddings, 9 norms
    # the planned header is the file's: contiguous ranges from the end of the header
    header = p.shard.header
    (n,) = struct.unpack("<Q", header[:8])
    entries = json.loads(header[8:8 + n])
    entries.pop("__metadata__")
    ranges = sorted((e["data_offsets"][0] + len(header), e["data_offsets"][1] + len(header), k)
                    for k, e in entries.items())
    assert ranges[0][0] == len(header) and ranges[-1][1] == p.shard.size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all((t[k].begin, t[k].end) == (b, e) for b, e, k in ranges)


def test_embed_lora_decomposes_the_transposed_embedding(family):
    p = plan(family, max_rank=8, embed_lora=True)
    assert kinds(p)["model.embed_tokens"] == EMBEDDING and kinds(p)["lm_head"] == LORA
    assert p.modules_to_save == ("input_layernorm", "post_attention_layernorm", "norm")
    t = {x.name: x for x in p.tensors}
    assert t[P + "model.embed_tokens.lora_embedding_A"].shape == (8, 384)  # (r, vocab)
    assert t[P + "model.embed_tokens.lora_embedding_B"].shape == (64, 8)  # (dim, r)
    assert t[P + "lm_head.lora_A.weight"].shape == (8, 64)


def test_include_exclude_and_save_module(family):
    p = plan(family, include=(r"layers\.0\.self_attn\.q_proj",))
    # embeddings are still saved (mergekit only lets -e leave them out); norms are not included
    assert {n for n, k in kinds(p).items() if k == LORA} == {"model.layers.0.self_attn.q_proj"}
    assert p.modules_to_save == ("embed_tokens", "lm_head")
    config = adapter_config(p)
    assert config["target_modules"] == ["q_proj"]
    assert config["exclude_modules"] == [f"model.layers.{i}.self_attn.q_proj" for i in (1, 2, 3)]

    p = plan(family, exclude=("embed_tokens", "mlp"))
    assert "model.embed_tokens" not in kinds(p) and kinds(p)["lm_head"] == SAVE
    assert not any("mlp" in n for n in kinds(p))

    p = plan(family, modules_to_save=("q_proj",), skip_undecomposable=True)
    assert {k for n, k in kinds(p).items() if n.endswith("q_proj")} == {SAVE}
    assert not any("norm" in n for n in kinds(p))
    assert p.modules_to_save == ("q_proj", "embed_tokens", "lm_head")


def test_adapter_config(family):
    config = adapter_config(plan(family))
    assert config == {
        "base_model_name_or_path": str(family["base"]), "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "r": 64, "lora_alpha": 64,
        "rank_pattern": {f"model.layers.{i}.self_attn.{x}_proj": 32 for i in range(4) for x in "kv"},
        "alpha_pattern": {f"model.layers.{i}.self_attn.{x}_proj": 32 for i in range(4) for x in "kv"},
        "target_modules": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
        "modules_to_save": ["embed_tokens", "input_layernorm", "post_attention_layernorm", "norm", "lm_head"],
        "use_rslora": False, "lora_dropout": 0.0, "fan_in_fan_out": False, "inference_mode": True}


def test_sv_epsilon_leaves_the_layout_to_the_counted_ranks(family):
    p = plan(family, sv_epsilon=0.01)
    assert p.shard is None and p.ranks is None
    ranks = {m.name: 3 for m in p.loras} | {"model.layers.2.mlp.up_proj": 0, "model.layers.1.self_attn.q_proj": 5}
    p = layout(p, ranks)
    names = {t.name for t in p.tensors}
    assert P + "model.layers.2.mlp.up_proj.lora_A.weight" not in names
    assert len(names) == 27 * 2 + 11
    config = adapter_config(p)
    assert config["r"] == 5 and config["rank_pattern"] == {n: 3 for n, r in ranks.items() if r == 3}
    assert config["exclude_modules"] == ["model.layers.2.mlp.up_proj"]  # PEFT must not target it


def test_biases_follow_their_module(tmp_path):
    base = make_model(tmp_path / "base", seed=1, family="qwen2")
    ft = make_model(tmp_path / "ft", seed=2, base=base)
    p = plan_extraction(ft, base, ExtractOptions(max_rank=4))
    names = {t.name for t in p.tensors}
    q = P + "model.layers.0.self_attn.q_proj"
    assert {q + ".lora_A.weight", q + ".lora_B.weight", q + ".base_layer.bias"} <= names
    assert not any(n.endswith("o_proj.base_layer.bias") for n in names)
    assert adapter_config(p)["bias"] == "lora_only"  # PEFT's layout for a LoRA with trained biases


def test_a_tied_head_is_saved_from_the_embedding(tmp_path):
    base = make_model(tmp_path / "base", seed=1, tie_word_embeddings=True)
    ft = make_model(tmp_path / "ft", seed=2, base=base)
    p = plan_extraction(ft, base, ExtractOptions())
    head = next(t for t in p.tensors if t.name == P + "lm_head.weight")
    assert head.source.name == "model.embed_tokens.weight"
    assert adapter_config(p)["ensure_weight_tying"] is True


def test_another_vocabulary_keeps_embeddings_whole(tmp_path):
    base = make_model(tmp_path / "base", seed=1)
    ft = make_model(tmp_path / "ft", seed=2, base=base, extra_vocab_rows=8)
    p = plan_extraction(ft, base, ExtractOptions(embed_lora=True))
    assert kinds(p)["model.embed_tokens"] == SAVE and kinds(p)["lm_head"] == SAVE
    assert p.vocab == (384, 392)
    assert any("--embed-lora ignored" in n for n in p.notes)
    assert any("resize_token_embeddings(392)" in n for n in p.notes)


def test_problems_are_errors(family, tmp_path):
    other = make_model(tmp_path / "other", seed=1, intermediate=96)
    with pytest.raises(MergeflowError, match=r"model.layers.0.mlp.gate_proj.weight: \[128, 64\] in .* but "
                                             r"\[96, 64\] in the base"):
        plan_extraction(family["a"], other, ExtractOptions())
    with pytest.raises(MergeflowError, match="--include-regex '\\(': not a regular expression"):
        plan(family, include=("(",))
    with pytest.raises(MergeflowError, match="--max-rank 0: the rank must be at least 1"):
        plan(family, max_rank=0)
    with pytest.raises(MergeflowError, match="no module .* is left to decompose"):
        plan(family, include=("nothing-matches",))
    with pytest.raises(MergeflowError, match="--sv-epsilon -1.0"):
        plan(family, sv_epsilon=-1.0)
