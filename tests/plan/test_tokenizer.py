"""Tokenizer and embedding merging: output vocabularies, row alignment, overrides, checks.

A family of tiny models whose tokenizers differ: `chat` adds two chat tokens, `padded` has 8
embedding rows beyond its tokenizer, `perm` numbers the same tokens differently, `ext` has 16
more BPE tokens; `tied` is a separate model with a tied LM head and the chat tokens.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from mergeflow.cli import main
from mergeflow.errors import ConfigError, MergeflowError
from mergeflow.exec.graph import jobs
from mergeflow.exec.options import RunOptions
from mergeflow.exec.read import inputs
from mergeflow.output.merge import run_merge
from mergeflow.plan import plan_merge
from mergeflow.plan.vocab import check_output
from mergeflow.spec.config import parse_config
from mergeflow.testing import CHAT_TOKENS, CHATML_TEMPLATE, TokenizerSpec, make_model

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
SMALL = {"hidden": 32, "layers": 2, "intermediate": 64, "heads": 2, "kv_heads": 1}
CHAT = TokenizerSpec(added_tokens=CHAT_TOKENS, chat_template=CHATML_TEMPLATE)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokzoo")
    base = make_model(root / "base", seed=0, **SMALL)
    return {
        "base": base,
        "chat": make_model(root / "chat", seed=1, base=base, tokenizer=CHAT),
        "chat2": make_model(root / "chat2", seed=5, base=base, tokenizer=CHAT),
        "padded": make_model(root / "padded", seed=2, base=base, extra_vocab_rows=8),
        "perm": make_model(root / "perm", seed=3, base=base, tokenizer=TokenizerSpec(permute_seed=9)),
        "ext": make_model(root / "ext", seed=4, base=base, tokenizer=TokenizerSpec(vocab_size=400)),
        "tied": make_model(root / "tied", seed=7, tie_word_embeddings=True, tokenizer=CHAT, **SMALL),
    }


def vocab(model_dir: Path) -> dict[str, int]:
    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab(with_added_tokens=True)


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def config(zoo, names: list[str], extra: str = "", base: str | None = "base", weights=None) -> str:
    weights = weights or [1.0] * len(names)
    models = "".join(f"  - model: {zoo[n]}\n    parameters: {{weight: {w}}}\n" for n, w in zip(names, weights))
    head = f"base_model: {zoo[base]}\n" if base else ""
    return f"merge_method: linear\n{head}models:\n{models}dtype: float32\n{extra}"


def plan_of(text: str):
    return plan_merge(parse_config(text))


def aligned(plan, name: str) -> list[torch.Tensor]:
    """Every input's matrix of tensor `name` re-indexed to the output vocabulary, as the
    merge task reads it (xs, then the base)."""
    job = next(j for j in jobs(plan, "/nowhere") if j.name == name)
    with inputs(job, job.shape[0]) as rows:
        xs, base = rows(0, job.shape[0])
    return [x.clone() for x in xs] + ([base.clone()] if base is not None else [])


def merge(text: str, tmp_path: Path, name: str = "out") -> Path:
    cfg = tmp_path / f"{name}.yml"
    cfg.write_text(text)
    out = tmp_path / name
    assert main(["run", str(cfg), str(out), "--scheduler", "sync", "--quiet"]) == 0
    return out


# ----------------------------------------------------------------------------- vocabularies


def test_union_vocabulary_is_base_then_new_tokens_then_added_tokens(zoo):
    plan = plan_of(config(zoo, ["base", "chat", "padded", "perm", "ext"], "tokenizer_source: union\n"))
    base, ext = vocab(zoo["base"]), vocab(zoo["ext"])
    new = {t: i for t, i in ext.items() if t not in base}  # ext's 16 extra BPE tokens, ids 384..399
    assert sorted(new.values()) == list(range(384, 400))
    out = json.loads(dict(plan.tokenizer.files)["tokenizer.json"])
    got = Tokenizer.from_str(json.dumps(out)).get_vocab(with_added_tokens=True)
    assert got == {**base, **new, "<|im_start|>": 400, "<|im_end|>": 401}
    assert plan.tokenizer.rows == 402 and plan.out_config["vocab_size"] == 402
    assert {t.name: t.shape for t in plan.tensors if t.vocab} == {EMBED: (402, 32), HEAD: (402, 32)}
    # the new BPE tokens come with their merges, so text reaches them as it does in `ext`
    text = " the quick brown fox jumps over the lazy dog; merging task vectors"
    ext_tok = Tokenizer.from_file(str(zoo["ext"] / "tokenizer.json"))
    assert Tokenizer.from_str(json.dumps(out)).encode(text).tokens == ext_tok.encode(text).tokens


@pytest.mark.parametrize("source, expected", [
    ("base", "base"), ("{chat}", "chat"), ("model:{perm}", "perm"), ("{padded}", "base")])
def test_base_and_model_sources(zoo, source, expected):
    text = config(zoo, ["base", "chat", "padded", "perm"], f"tokenizer_source: {source.format(**zoo)}\n")
    plan = plan_of(text)
    want = vocab(zoo[expected])
    files = dict(plan.tokenizer.files)
    assert Tokenizer.from_str(files["tokenizer.json"].decode()).get_vocab(with_added_tokens=True) == want
    assert plan.tokenizer.rows == len(want) == plan.out_config["vocab_size"]
    if expected == "perm":  # special-token ids in config.json follow the chosen tokenizer
        assert plan.out_config["eos_token_id"] == want["</s>"] != vocab(zoo["base"])["</s>"]
        generation = json.loads(files["generation_config.json"])
        assert (generation["bos_token_id"], generation["pad_token_id"]) == (want["<s>"], want["<pad>"])
    else:
        assert "generation_config.json" not in files  # the reference's is copied as it is


def test_base_source_drops_tokens_beyond_the_base_vocab_size(zoo, tmp_path):
    # a base whose tokenizer has chat tokens but only 384 embedding rows (config vocab_size 384)
    short = tmp_path / "short"
    make_model(short, seed=1, base=zoo["base"], tokenizer=CHAT)
    cfg = json.loads((short / "config.json").read_text())
    state = tensors(short)
    from safetensors.torch import save_file

    save_file({k: (v[:384].contiguous() if k in (EMBED, HEAD) else v) for k, v in state.items()},
              str(short / "model.safetensors"), metadata={"format": "pt"})
    (short / "config.json").write_text(json.dumps({**cfg, "vocab_size": 384}))
    zoo = {**zoo, "short": short}
    plan = plan_of(config(zoo, ["short", "base"], "tokenizer_source: base\n", base="short"))
    files = dict(plan.tokenizer.files)
    assert Tokenizer.from_str(files["tokenizer.json"].decode()).get_vocab(with_added_tokens=True) == vocab(zoo["base"])
    assert "<|im_start|>" not in json.loads(files["tokenizer_config.json"]).get("added_tokens_decoder", {})


# ----------------------------------------------------------------------------- rows


def test_rows_follow_their_tokens_and_single_owners_are_exact(zoo, tmp_path):
    text = config(zoo, ["base", "chat", "padded", "perm"], "tokenizer_source: union\n")
    plan = plan_of(text)
    out_vocab = vocab(zoo["chat"])  # base's tokens, then the chat tokens
    raw = {n: tensors(zoo[n]) for n in ("base", "chat", "padded", "perm")}
    for name in (EMBED, HEAD):
        mats = aligned(plan, name)
        assert [m.shape for m in mats] == [(386, 32)] * 4
        for tok, i in out_vocab.items():
            if tok in CHAT_TOKENS:  # only `chat` has them: every model gets chat's own row
                for m in mats:
                    assert torch.equal(m[i], raw["chat"][name][i]), (name, tok)
            else:  # everyone has it, each model its own row, wherever its tokenizer put it
                for m, n in zip(mats, ("base", "chat", "padded", "perm")):
                    assert torch.equal(m[i], raw[n][name][vocab(zoo[n])[tok]]), (name, tok, n)
    # end to end, a two-model merge (weights 1, 1: the mean is exact) keeps chat's rows exactly
    out = merge(config(zoo, ["perm", "chat"], "tokenizer_source: union\n", base=None), tmp_path)
    merged, perm, chat = tensors(out), raw["perm"], raw["chat"]
    ids = vocab(out)
    assert ids == vocab(zoo["perm"]) | {"<|im_start|>": 384, "<|im_end|>": 385}
    for tok in CHAT_TOKENS:
        assert torch.equal(merged[EMBED][ids[tok]], chat[EMBED][vocab(zoo["chat"])[tok]])
    s = ids["<s>"]
    expected = (perm[HEAD][s].float() + chat[HEAD][vocab(zoo["chat"])["<s>"]].float()) / 2
    assert torch.equal(merged[HEAD][s], expected)


def test_default_rows_base_first_then_mean_of_owners(zoo):
    im = "<|im_start|>"
    raw = {n: tensors(zoo[n])[EMBED] for n in ("chat", "chat2")}
    row = vocab(zoo["chat"])[im]
    # the base (chat) has the token: models lacking it (base) take the base's row
    mats = aligned(plan_of(config(zoo, ["base", "chat", "chat2"], "tokenizer_source: union\n", base="chat")), EMBED)
    assert torch.equal(mats[0][row], raw["chat"][row])
    # the base lacks it: the mean over the models that have it, summed in float32
    mats = aligned(plan_of(config(zoo, ["base", "chat", "chat2"], "tokenizer_source: union\n")), EMBED)
    assert torch.equal(mats[0][row], (raw["chat"][row].float() + raw["chat2"][row].float()) / 2)
    assert torch.equal(mats[1][row], raw["chat"][row]) and torch.equal(mats[2][row], raw["chat2"][row])


def test_force_model_token_zero_and_unknown_tokens(zoo):
    perm = vocab(zoo["perm"])
    text = config(zoo, ["base", "chat", "perm"], f"""tokenizer:
  source: union
  tokens:
    "<|im_end|>":
      source: {{kind: model_token, model: {zoo['perm']}, token: "</s>"}}
      force: true
    "<pad>": {{source: {zoo['perm']}, force: true}}
    "<s>": {{source: {{kind: zero}}, force: true}}
    "</s>": {{source: {zoo['chat']}}}
    "<|tool|>": {{}}
""")
    plan = plan_of(text)
    ids = Tokenizer.from_str(dict(plan.tokenizer.files)["tokenizer.json"].decode()).get_vocab(True)
    assert ids["<|tool|>"] == 386  # a `tokens:` entry no vocabulary has is appended
    assert any("'<|tool|>' is in no input model" in w for w in plan.warnings)
    raw = tensors(zoo["perm"])[EMBED]
    for m in aligned(plan, EMBED):
        assert torch.equal(m[ids["<|im_end|>"]], raw[perm["</s>"]])  # forced, from perm's </s>
        assert torch.equal(m[ids["<pad>"]], raw[perm["<pad>"]])  # forced, perm's own row
        assert not m[ids["<s>"]].any() and not m[ids["<|tool|>"]].any()  # zeros
    base_mat = aligned(plan, EMBED)[0]  # not forced: every model that has `</s>` keeps its own
    assert torch.equal(base_mat[ids["</s>"]], tensors(zoo["base"])[EMBED][vocab(zoo["base"])["</s>"]])


def test_pad_to_multiple_of_fills_each_models_mean_row(zoo, tmp_path):
    extra = "tokenizer:\n  source: union\n  pad_to_multiple_of: 64\n"
    plan = plan_of(config(zoo, ["base", "chat", "padded"], extra))
    assert plan.tokenizer.rows == 448 and plan.out_config["vocab_size"] == 448
    for m in aligned(plan, HEAD):
        assert m.shape == (448, 32)
        # the mean of the model's 386 token rows, summed in float64 (so any chunking agrees)
        assert torch.equal(m[386:], m[:386].double().mean(0).float().expand(62, 32))
    out = merge(config(zoo, ["base", "chat", "padded"], extra), tmp_path)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 448
    assert tensors(out)[EMBED].shape == (448, 32)


def test_tied_head_is_aligned_from_the_input_embedding(zoo):
    plan = plan_of(config(zoo, ["base", "tied"], "tokenizer_source: union\n"))
    head = next(t for t in plan.tensors if t.name == HEAD)
    assert [i.tensor.name for i in head.all_inputs()] == [HEAD, EMBED]  # tied: its embedding serves
    tied, row = tensors(zoo["tied"])[EMBED], vocab(zoo["tied"])["<|im_end|>"]
    for m in aligned(plan, HEAD):
        assert torch.equal(m[row], tied[row])


def test_embed_slerp_merges_vocab_tensors_with_slerp(zoo):
    text = config(zoo, ["base", "chat"], "tokenizer_source: union\nembed_slerp: true\n", weights=[0.7, 0.3])
    plan = plan_of(text)
    by_name = {t.name: t for t in plan.tensors}
    for name in (EMBED, HEAD):
        t = by_name[name]
        assert (t.method, t.params, t.base.model, [i.model for i in t.inputs]) == ("slerp", (("t", 0.3),), 0, [1])
        assert [t.vocab.row_map(k) for k in (0, 1)] == [list(range(386)), list(range(384)) + [-1, -1]]
    assert by_name["model.norm.weight"].method == "linear"


# ----------------------------------------------------------------------------- output


def test_output_loads_in_transformers_and_accepts_the_tokenizers_ids(zoo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = config(zoo, ["base", "chat", "padded", "perm", "ext"], "tokenizer_source: union\nchat_template: auto\n")
    out = merge(text, tmp_path)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    prompt = tok.apply_chat_template([{"role": "user", "content": "merging task vectors"}],
                                     tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>user\nmerging")  # the chat model's template (auto)
    ids = tok(prompt).input_ids
    assert 400 in ids and 401 in ids and max(ids) < model.config.vocab_size == 402
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 402) and bool(torch.isfinite(logits).all())


@pytest.mark.parametrize("name, marker", [("chatml", "<|im_start|>user\nhi<|im_end|>\n"),
                                          ("llama3", "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"),
                                          ("mistral", "[INST] be brief\n\nhi [/INST]"),
                                          ("alpaca", "### Instruction:\nhi\n\n")])
def test_builtin_chat_templates_render(zoo, tmp_path, name, marker):
    from transformers import AutoTokenizer

    out = merge(config(zoo, ["base", "chat"], f"tokenizer_source: base\nchat_template: {name}\n"), tmp_path)
    saved = json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
    assert saved == (out / "chat_template.jinja").read_text()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    rendered = AutoTokenizer.from_pretrained(out).apply_chat_template(messages, tokenize=False)
    assert marker in rendered


def test_literal_template_without_tokenizer_setting_copies_the_base_files(zoo, tmp_path):
    out = merge(config(zoo, ["base", "perm"], "chat_template: \"{{ messages[0]['content'] }}!\"\n"), tmp_path)
    assert (out / "chat_template.jinja").read_text() == "{{ messages[0]['content'] }}!"
    assert (out / "tokenizer.json").read_bytes() == (zoo["base"] / "tokenizer.json").read_bytes()


def test_without_a_tokenizer_setting_different_vocab_sizes_are_refused(zoo):
    """mergekit 0.1.5: `Tensor size mismatch` for the embedding and the LM head, with the fix."""
    with pytest.raises(MergeflowError) as e:
        plan_of(config(zoo, ["base", "padded"], ""))
    for name in (EMBED, HEAD):
        assert (f"merge of {name}: the models' vocabularies differ in size ({zoo['base']}: 384x32, "
                f"{zoo['padded']}: 392x32)") in str(e.value)
    assert "`tokenizer_source: union`" in str(e.value) and "--unsafe-truncate-embeddings" in str(e.value)


def test_unsafe_truncation_cuts_to_the_fewest_rows_and_keeps_the_donor_vocab_size(zoo):
    """As mergekit's test_truncation_preserves_donor_config: rows cut to the smallest model's,
    config.json's vocab_size left as the reference's (392 here, the base)."""
    plan = plan_merge(parse_config(config(zoo, ["padded", "base"], "", base="padded")),
                      unsafe_truncate_embeddings=True)
    embed = next(t for t in plan.tensors if t.name == EMBED)
    assert embed.shape == (384, 32) and embed.inputs[0].crop == (384, 32) and embed.inputs[1].crop is None
    assert set(plan.truncated) == {EMBED, HEAD} and plan.out_config["vocab_size"] == 392
    assert any(w.startswith(f"{EMBED}: UNSAFE truncation") and "cut to 384x32" in w for w in plan.warnings)
    # a copied tokenizer with ids past the rows: refused normally, a warning when truncating
    with pytest.raises(MergeflowError, match="vocabularies differ in size"):
        plan_of(config(zoo, ["chat", "base"], "", base="chat"))
    plan = plan_merge(parse_config(config(zoo, ["chat", "base"], "", base="chat")), unsafe_truncate_embeddings=True)
    assert any("has token ids up to 385: the merged model will fail on those tokens" in w for w in plan.warnings)
    # a tokenizer setting wins over truncation (mergekit's test_tokenizer_alignment_takes_precedence)
    plan = plan_merge(parse_config(config(zoo, ["padded", "base"], "tokenizer_source: base\n", base="padded")),
                      unsafe_truncate_embeddings=True)
    assert not plan.truncated and {t.shape for t in plan.tensors if t.name == EMBED} == {(384, 32)}


def test_same_sizes_numbered_differently_warn(zoo):
    """Same shapes, different numbering: merged by id, so the plan says how to align by token."""
    warnings = plan_of(config(zoo, ["base", "perm"], "")).warnings
    assert any(w.startswith(f"the tokenizers of {zoo['perm']} number tokens differently") for w in warnings)


def test_consistency_check_fails_the_run_before_config_json(zoo, tmp_path):
    plan = plan_of(config(zoo, ["base", "chat"], "tokenizer_source: union\n"))
    bad = dataclasses.replace(plan, out_config={**plan.out_config, "vocab_size": 385})
    with pytest.raises(MergeflowError, match=r"vocab_size is 385 but model.embed_tokens.weight has 386 rows.*"
                                             r"lm_head.weight has 386 rows.*token ids up to 385"):
        run_merge(bad, tmp_path / "out", RunOptions(scheduler="sync", quiet=True))
    assert not (tmp_path / "out" / "config.json").exists()
    check_output(tmp_path / "out", plan.out_config, {EMBED: 386, HEAD: 386})  # the real plan passes


def test_token_source_problems_are_located(zoo, tmp_path):
    text = config(zoo, ["base", "chat"], f"""tokenizer:
  tokens:
    "<|im_end|>": {{source: {zoo['perm']}}}
    "<|im_start|>": {{source: {zoo['base']}}}
""")
    cfg = tmp_path / "c.yml"
    cfg.write_text(text)
    from mergeflow.spec.config import load_config

    with pytest.raises(MergeflowError) as err:
        plan_merge(load_config(cfg))
    msg, lines = str(err.value), text.splitlines()
    end, start = (next(i + 1 for i, line in enumerate(lines) if tok in line) for tok in CHAT_TOKENS[::-1])
    assert f"c.yml:{end}:20: model {zoo['perm']} is not one of the merged models" in msg
    assert f"c.yml:{start}:22: model {zoo['base']} has no token '<|im_start|>'" in msg
    assert "2 problem(s)" in msg


@pytest.mark.parametrize("extra, expected", [
    ("tokenizer_source: base\ntokenizer: {source: union}\n", "give either `tokenizer_source` or"),
    ("chat_template: chatmll\n", "unknown chat_template `chatmll`"),
    ("chat_template: \"{% if %}\"\n", "chat_template is not valid Jinja"),
    ("tokenizer: {tokens: {x: {source: {kind: model_token, model: a, token: y, token_id: 1}}}}\n",
     "exactly one of `token` or `token_id`"),
    ("tokenizer: {tokens: {x: {source: {kind: zeros}}}}\n", "`kind` must be `model_token`"),
])
def test_tokenizer_config_errors(extra, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_config("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n" + extra)


def test_model_prefix_form_and_model_token_source_parse():
    cfg = parse_config("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n"
                       "tokenizer:\n  source: model:org/name\n  tokens:\n"
                       "    x: {source: {kind: model_token, model: a, token_id: 3}}\n")
    assert str(cfg.tokenizer.source) == "org/name"
    assert cfg.tokenizer.tokens["x"].source.token_id == 3
