"""Tests for mergeflow.testing: the tiny models load, differ by the noise, and are reproducible."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from mergeflow.testing import (
    CHAT_TOKENS,
    CHATML_TEMPLATE,
    FAMILIES,
    TokenizerSpec,
    arch_for_size,
    iter_tensors,
    make_family,
    make_model,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"
SMALL = {"hidden": 32, "layers": 2, "intermediate": 64, "heads": 4, "kv_heads": 2}
NOISE = 0.01


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("m") / "base", seed=0, **SMALL)


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(model_dir))


def _vocab(model_dir: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab(with_added_tokens=True)


def _files(model_dir: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(model_dir.iterdir())}


def _check_loads(model_dir: Path, text: str = "the quick brown fox") -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok(text, return_tensors="pt")
    assert enc.input_ids[0, 0].item() == tok.bos_token_id
    logits = model(**enc).logits
    assert logits.shape[-1] == model.config.vocab_size
    assert torch.isfinite(logits).all()
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_loads_in_transformers(tmp_path: Path, family: str) -> None:
    path = make_model(tmp_path / family, seed=1, family=family, shards=2, **SMALL)
    _check_loads(path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    tensors = _tensors(path)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())


def test_same_arguments_give_same_bytes(tmp_path: Path, base: Path) -> None:
    again = make_model(tmp_path / "again", seed=0, **SMALL)
    assert _files(again) == _files(base)
    ft = [make_model(tmp_path / f"ft{i}", seed=5, base=base) for i in range(2)]
    assert _files(ft[0]) == _files(ft[1])
    other = make_model(tmp_path / "other", seed=1, **SMALL)
    assert _files(other)["model.safetensors"] != _files(base)["model.safetensors"]


def test_finetune_is_base_plus_noise(tmp_path: Path, base: Path) -> None:
    ft = make_model(tmp_path / "ft", seed=3, base=base, noise=NOISE)
    _check_loads(ft)
    b, f = _tensors(base), _tensors(ft)
    assert set(b) == set(f)
    for name in b:
        delta = f[name].float() - b[name].float()
        assert delta.std().item() == pytest.approx(NOISE, rel=0.25), name
    assert _files(ft)["tokenizer.json"] == _files(base)["tokenizer.json"]
    assert json.loads((ft / "config.json").read_text())["hidden_size"] == SMALL["hidden"]


def test_added_chat_tokens_and_template(tmp_path: Path, base: Path) -> None:
    spec = TokenizerSpec(added_tokens=CHAT_TOKENS, chat_template=CHATML_TEMPLATE)
    ft = make_model(tmp_path / "chat", seed=4, base=base, tokenizer=spec)
    _check_loads(ft, "<|im_start|>user hi<|im_end|>")
    base_vocab, vocab = _vocab(base), _vocab(ft)
    assert [vocab[t] for t in CHAT_TOKENS] == [len(base_vocab), len(base_vocab) + 1]
    assert json.loads((ft / "tokenizer_config.json").read_text())["chat_template"] == CHATML_TEMPLATE
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ft)
    assert tok.convert_tokens_to_ids("<|im_end|>") == len(base_vocab) + 1
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n"
    embed = _tensors(ft)["model.embed_tokens.weight"]
    assert embed.shape[0] == len(base_vocab) + 2  # old rows carried over, two fresh ones


def test_extra_vocab_rows(tmp_path: Path, base: Path) -> None:
    padded = make_model(tmp_path / "padded", seed=0, extra_vocab_rows=8, **SMALL)
    _check_loads(padded)
    rows = len(_vocab(padded)) + 8
    assert json.loads((padded / "config.json").read_text())["vocab_size"] == rows
    assert _tensors(padded)["lm_head.weight"].shape == (rows, SMALL["hidden"])
    ft = make_model(tmp_path / "ft", seed=1, base=padded)  # a fine-tune keeps the padding
    assert _tensors(ft)["model.embed_tokens.weight"].shape[0] == rows


def test_permuted_vocabulary_keeps_rows_with_their_tokens(tmp_path: Path, base: Path) -> None:
    ft = make_model(tmp_path / "perm", seed=2, base=base, tokenizer=TokenizerSpec(permute_seed=9))
    _check_loads(ft)
    base_vocab, vocab = _vocab(base), _vocab(ft)
    assert set(vocab) == set(base_vocab) and vocab != base_vocab
    tokens = sorted(base_vocab)
    b = _tensors(base)["model.embed_tokens.weight"][[base_vocab[t] for t in tokens]]
    f = _tensors(ft)["model.embed_tokens.weight"][[vocab[t] for t in tokens]]
    assert (f.float() - b.float()).std().item() == pytest.approx(NOISE, rel=0.25)


def test_tied_embeddings_write_no_lm_head(tmp_path: Path) -> None:
    path = make_model(tmp_path / "tied", seed=0, tie_word_embeddings=True, **SMALL)
    _check_loads(path)
    assert "lm_head.weight" not in _tensors(path)


def test_make_family(tmp_path: Path) -> None:
    models = make_family(tmp_path, finetunes=("a", "b"), layers=1, hidden=32, intermediate=32)
    assert list(models) == ["base", "a", "b"]
    a, b = _tensors(models["a"]), _tensors(models["b"])
    assert not torch.equal(a["model.norm.weight"], b["model.norm.weight"])


def test_misuse_is_reported(tmp_path: Path, base: Path) -> None:
    with pytest.raises(ValueError, match="hidden"):
        make_model(tmp_path / "x", seed=0, base=base, hidden=128)
    with pytest.raises(FileExistsError):
        make_model(base, seed=0)
    with pytest.raises(ValueError, match="too small"):
        make_model(tmp_path / "y", seed=0, tokenizer=TokenizerSpec(vocab_size=100))
    with pytest.raises(ValueError, match="unknown family"):
        make_model(tmp_path / "z", seed=0, family="bert")


def test_arch_for_size_hits_the_target() -> None:
    arch = arch_for_size(2 * 10**9)
    h, i, kv = arch["hidden"], arch["intermediate"], arch["kv_heads"]
    per_layer = 2 * h * h + 2 * h * (h // arch["heads"]) * kv + 3 * h * i + 2 * h
    total = 2 * (arch["layers"] * per_layer + 2 * 384 * h + h)
    assert total == pytest.approx(2 * 10**9, rel=0.05)


def test_committed_examples_match_the_script(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_models", EXAMPLES.parent / "make_models.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--out", str(tmp_path)])
    for name in ("base", *script.FINETUNES):
        for file in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            fresh, committed = tmp_path / name / file, EXAMPLES / name / file
            assert fresh.read_bytes() == committed.read_bytes(), f"rerun examples/make_models.py: {committed}"
