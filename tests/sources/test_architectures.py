"""Layer inference from tensor names, and the family table."""

from __future__ import annotations

from mergeflow.sources.architectures import (
    FAMILIES,
    family,
    infer_layout,
    is_vocab_tensor,
    layer_count,
    natural_key,
)


def test_llama_layout():
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
        f"model.layers.{i}.{s}" for i in range(3) for s in ("mlp.up_proj.weight", "input_layernorm.weight")]
    lay = infer_layout(names, family({"model_type": "llama"}))
    assert (lay.prefix, lay.layers) == ("model.layers.", 3)
    assert set(lay.layer_suffixes) == {"mlp.up_proj.weight", "input_layernorm.weight"}
    assert lay.pre == ("model.embed_tokens.weight",)
    assert lay.post == ("model.norm.weight", "lm_head.weight")
    assert lay.layer_name(2, "mlp.up_proj.weight") == "model.layers.2.mlp.up_proj.weight"


def test_gpt2_and_neox_layouts():
    gpt2 = ["wte.weight", "wpe.weight", "ln_f.weight", "h.0.attn.c_attn.weight", "h.1.attn.c_attn.weight",
            "h.10.mlp.c_fc.weight"]
    lay = infer_layout(gpt2, family({"model_type": "gpt2"}))
    assert (lay.prefix, lay.layers, set(lay.pre), lay.post) == ("h.", 11, {"wte.weight", "wpe.weight"}, ("ln_f.weight",))
    neox = ["gpt_neox.embed_in.weight", "gpt_neox.layers.0.mlp.dense_h_to_4h.weight",
            "gpt_neox.final_layer_norm.weight", "embed_out.weight"]
    lay = infer_layout(neox, family({"model_type": "gpt_neox"}))
    assert (lay.prefix, lay.pre) == ("gpt_neox.layers.", ("gpt_neox.embed_in.weight",))
    assert set(lay.post) == {"gpt_neox.final_layer_norm.weight", "embed_out.weight"}
    assert is_vocab_tensor("embed_out.weight", family({"model_type": "gpt_neox"}))


def test_layer_prefix_is_the_one_with_most_layers():
    # a per-expert index must not be mistaken for the layer index
    names = [f"model.layers.{i}.mlp.experts.{e}.w1.weight" for i in range(4) for e in range(2)]
    assert infer_layout(names, family({})).prefix == "model.layers."


def test_known_families_and_layer_count_keys():
    for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt_neox", "stablelm", "gpt2"):
        assert t in FAMILIES
    assert layer_count({"model_type": "gpt2", "n_layer": 12}) == 12
    assert layer_count({"model_type": "llama", "num_hidden_layers": 32}) == 32


def test_natural_order():
    names = ["model.layers.10.x", "model.layers.2.x", "model.layers.1.x"]
    assert sorted(names, key=natural_key) == ["model.layers.1.x", "model.layers.2.x", "model.layers.10.x"]
