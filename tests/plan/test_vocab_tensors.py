"""Vocab tensors (dim 0 indexed by token): never dropped, aligned, refused or truncated.

Without a tokenizer setting, row counts that differ are refused (mergekit 0.1.5's "Tensor size
mismatch") unless --unsafe-truncate-embeddings cuts every input to the fewest rows, keeping
the donor's vocab_size as mergekit's test_truncation_preserves_donor_config asserts. A 1-D
per-token tensor (phi's lm_head.bias) is a vocab tensor like the embedding matrices.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeflow.cli import main
from mergeflow.errors import MergeflowError
from mergeflow.plan import plan_merge
from mergeflow.spec.config import parse_config
from mergeflow.testing import CHAT_TOKENS, TokenizerSpec, make_model

EMBED, HEAD, BIAS = "model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"
SMALL = {"hidden": 32, "layers": 2, "intermediate": 64, "heads": 2, "kv_heads": 1}


def with_bias(model: Path, bias: torch.Tensor) -> Path:
    file = model / "model.safetensors"
    state = load_file(file)
    save_file({**state, BIAS: bias}, file, metadata={"format": "pt"})
    return model


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """float32 models: base (384 tokens), chat (+2 chat tokens: 386 rows), big (400 rows);
    base and chat carry an lm_head.bias of 0..383 and 1000..1385."""
    root = tmp_path_factory.mktemp("vocab")
    base = make_model(root / "base", seed=0, dtype=torch.float32, **SMALL)
    chat = make_model(root / "chat", seed=1, base=base, tokenizer=TokenizerSpec(added_tokens=CHAT_TOKENS))
    big = make_model(root / "big", seed=2, base=base, tokenizer=TokenizerSpec(vocab_size=400))
    return {"base": base, "chat": chat, "big": big, "biased-base": with_bias(
        make_model(root / "biased-base", seed=3, base=base), torch.arange(384.0)),
        "biased-chat": with_bias(make_model(root / "biased-chat", seed=4, base=chat), 1000 + torch.arange(386.0))}


def linear(zoo, a: str, b: str, extra: str = "") -> str:
    return (f"merge_method: linear\nmodels:\n  - model: {zoo[a]}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {zoo[b]}\n    parameters: {{weight: 0.5}}\n{extra}")


def run(tmp_path: Path, text: str, *args: str) -> Path:
    (tmp_path / "merge.yml").write_text(text)
    assert main(["run", str(tmp_path / "merge.yml"), str(tmp_path / "out"), "--scheduler", "sync",
                 "--quiet", *args]) == 0
    return tmp_path / "out"


def test_lm_head_bias_is_aligned_by_token(zoo, tmp_path):
    """union: 384 base tokens, then chat's two; each bias row is the mean of the models' rows of
    that token, and chat's own where only chat has it: 500 + i, then 1384, 1385."""
    plan = plan_merge(parse_config(linear(zoo, "biased-base", "biased-chat", "tokenizer_source: union\n")))
    bias = next(t for t in plan.tensors if t.name == BIAS)
    assert bias.vocab is not None and bias.shape == (386,)
    out = load_file(run(tmp_path, linear(zoo, "biased-base", "biased-chat", "tokenizer_source: union\n"))
                    / "model.safetensors")
    assert torch.equal(out[BIAS], torch.cat([500 + torch.arange(384.0), torch.tensor([1384.0, 1385.0])]))


def test_lm_head_bias_of_other_sizes_is_refused_or_truncated_like_the_embeddings(zoo, tmp_path):
    text = linear(zoo, "biased-base", "biased-chat")
    with pytest.raises(MergeflowError) as e:
        plan_merge(parse_config(text))
    assert "3 problem(s)" in str(e.value) and f"merge of {BIAS}: the models' vocabularies differ" in str(e.value)
    out = load_file(run(tmp_path, text, "--unsafe-truncate-embeddings") / "model.safetensors")
    assert torch.equal(out[BIAS], 500 + torch.arange(384.0))


def test_truncation_keeps_every_tensor_and_the_donor_vocab_size(zoo, tmp_path):
    """The case that used to drop embed_tokens and lm_head (task arithmetic, every other model's
    vocabulary different from the base's): now refused, or with the flag every tensor is
    written, cut to the fewest rows; config.json keeps the base's vocab_size (400)."""
    text = (f"merge_method: task_arithmetic\nbase_model: {zoo['big']}\nmodels:\n  - model: {zoo['base']}\n"
            "    parameters: {weight: 1.0}\n")
    with pytest.raises(MergeflowError, match="2 problem"):
        plan_merge(parse_config(text))
    out = run(tmp_path, text, "--unsafe-truncate-embeddings")
    merged, big = load_file(out / "model.safetensors"), load_file(zoo["big"] / "model.safetensors")
    assert merged.keys() == big.keys() and len(merged) == 21
    assert merged[EMBED].shape == merged[HEAD].shape == (384, 32)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 400


def test_truncated_linear_merge_has_mergekits_numbers(zoo, tmp_path):
    """mergekit's test: (a[:rows] + b) / 2 for embeddings of 400 and 384 rows."""
    out = load_file(run(tmp_path, linear(zoo, "big", "base"), "--unsafe-truncate-embeddings") / "model.safetensors")
    big, base = load_file(zoo["big"] / "model.safetensors"), load_file(zoo["base"] / "model.safetensors")
    for name in (EMBED, HEAD):
        assert torch.equal(out[name], big[name][:384] * 0.5 + base[name] * 0.5)


def test_only_the_base_supplies_a_tensor_then_it_is_the_base(zoo, tmp_path):
    """A base-required method whose sources are all the base (sce takes zero others): every
    tensor is the base's, none dropped."""
    text = f"merge_method: sce\nbase_model: {zoo['base']}\nmodels:\n  - model: {zoo['base']}\n"
    plan = plan_merge(parse_config(text))
    assert len(plan.tensors) == 21 and {t.method for t in plan.tensors} == {"passthrough"}
    out = load_file(run(tmp_path, text) / "model.safetensors")
    assert all(torch.equal(out[k], v) for k, v in load_file(zoo["base"] / "model.safetensors").items())
