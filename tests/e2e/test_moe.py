"""`mergeflow moe` end to end: MoEs from a base and three fine-tunes load in transformers and
route, with mergekit-moe's router weights; random routers and noise give the same bytes on
every scheduler; an interrupted MoE resumes to the same bytes.

The expected routers are computed here from mergekit-moe 0.1.5's definition, step by step in
its dtypes (`benchmarks/parity_moe.py` compares against mergekit-moe's own output files).
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from mergeflow import testing
from mergeflow.cli import main
from mergeflow.exec.journal import read_journal
from mergeflow.plan.moe import plan_moe
from mergeflow.spec.moe import load_moe_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "models"
PROMPTS = {  # expert -> (positive, negative)
    "instruct": (["Hello, how are you today?", "please help me write a letter"], []),
    "code": (["def merge(models, weights): return sum(models)"], ["the lazy dog"]),
    "math": (["1 2 3 4 5 = 15", "x + y = z"], []),
}


def moe_yaml(base: Path, experts: dict[str, Path], mode: str, extra: str = "", expert_extra=None) -> str:
    lines = [f"base_model: {base}", f"gate_mode: {mode}", "dtype: bfloat16", "experts:"]
    for name, path in experts.items():
        pos, neg = PROMPTS[name]
        lines += [f"  - source_model: {path}", f"    positive_prompts: {json.dumps(pos)}"]
        lines += [f"    negative_prompts: {json.dumps(neg)}"] if neg else []
        lines += [f"    {k}: {v}" for k, v in (expert_extra or {}).get(name, {}).items()]
    return "\n".join(lines) + "\n" + extra


def moe(config: Path, out: Path, *extra: str) -> int:
    return main(["moe", str(config), str(out), "--quiet", "--dashboard-address", "127.0.0.1:0", *extra])


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return dict(testing.iter_tensors(model_dir))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def tokenized(base: Path, prompts: list[str]):
    """mergekit-moe's tokenization: `<bos>` + prompt, no special tokens, left-padded with BOS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    tok.padding_side, tok.pad_token_id = "left", tok.bos_token_id
    return tok([tok.bos_token + p for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)


def expected_cheap_embed(base: Path, layers: int) -> list[torch.Tensor]:
    """Per expert: one-hot token counts times the embedding (float32), normalized; negative
    prompts' the same; their difference normalized; every layer alike."""
    embed = tensors(base)["model.embed_tokens.weight"].float()

    def vector(prompts):
        t = tokenized(base, prompts)
        onehot = torch.nn.functional.one_hot(t["input_ids"], num_classes=embed.shape[0]).float()
        total = ((onehot @ embed) * t["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
        return (total / total.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(layers, 1)

    return [_difference(vector, *PROMPTS[name]) for name in PROMPTS]


def expected_hidden(base: Path, gated: list[tuple[list[str], list[str]]]) -> list[torch.Tensor]:
    """Per gated expert: the bfloat16 base model's input hidden state of every layer at the
    last token, averaged over the prompts; minus the negatives'; normalized."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)

    def vector(prompts):
        with torch.no_grad():
            states = model(**tokenized(base, prompts), output_hidden_states=True).hidden_states
        last = torch.stack(states[:-1])[:, :, -1, :]  # (layers, prompts, hidden)
        return last.sum(dim=1) / last.shape[1]

    return [_difference(vector, pos, neg) for pos, neg in gated]


def _difference(vector, positive, negative) -> torch.Tensor:
    v = vector(positive)
    if negative:
        v = v - vector(negative)
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def assert_routes(out: Path, cls: str, experts: int) -> None:
    """It loads with every weight in place, gives finite logits and sends tokens to several experts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == cls
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tok = AutoTokenizer.from_pretrained(out)
    batch = tok([p for pos, _ in PROMPTS.values() for p in pos], return_tensors="pt", padding=True)
    with torch.no_grad():
        result = model(**batch, output_router_logits=True)
    assert torch.isfinite(result.logits).all()
    assert len(result.router_logits) == model.config.num_hidden_layers
    chosen = torch.cat(result.router_logits).topk(2, dim=-1).indices
    assert chosen.shape[-1] == 2 and len(chosen.unique()) == experts


@pytest.fixture(scope="module")
def qwen2_family(tmp_path_factory) -> dict[str, Path]:
    return testing.make_family(tmp_path_factory.mktemp("qwen2"), family="qwen2", seed=5, finetunes=list(PROMPTS))


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> tuple[Path, Path]:
    """(config, output) of a cheap_embed Mixtral of the shipped example models."""
    root = tmp_path_factory.mktemp("mixtral")
    config = root / "mixtral.yml"
    config.write_text(moe_yaml(EXAMPLES / "base", {n: EXAMPLES / n for n in PROMPTS}, "cheap_embed"))
    assert moe(config, root / "out", "--scheduler", "sync") == 0
    return config, root / "out"


def test_mixtral_loads_routes_and_has_mergekits_cheap_embed_routers(mixtral):
    config, out = mixtral
    assert_routes(out, "MixtralForCausalLM", 3)
    got, base = tensors(out), tensors(EXAMPLES / "base")
    expert = {n: tensors(EXAMPLES / n) for n in PROMPTS}
    routers = torch.stack(expected_cheap_embed(EXAMPLES / "base", 4), dim=1)  # (layers, experts, hidden)
    for layer in range(4):
        p = f"model.layers.{layer}."
        assert torch.equal(got[p + "mlp.gate.weight"], routers[layer].to(torch.bfloat16))
        for e, name in enumerate(PROMPTS):
            w = {proj: expert[name][f"{p}mlp.{proj}.weight"] for proj in ("gate_proj", "up_proj", "down_proj")}
            assert torch.equal(got[p + "mlp.experts.gate_up_proj"][e], torch.cat([w["gate_proj"], w["up_proj"]]))
            assert torch.equal(got[p + "mlp.experts.down_proj"][e], w["down_proj"])
        assert torch.equal(got[p + "self_attn.q_proj.weight"], base[p + "self_attn.q_proj.weight"])
    assert set(got) == set(base) - {n for n in base if ".mlp." in n} | {
        f"model.layers.{i}.mlp.{n}" for i in range(4) for n in ("gate.weight", "experts.gate_up_proj", "experts.down_proj")}
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["architectures"], cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (["MixtralForCausalLM"], 3, 2)
    assert (out / "mergeflow_moe_config.yml").read_text() == config.read_text()
    assert "moe" in (out / "README.md").read_text()


def test_qwen2_moe_loads_routes_and_has_mergekits_hidden_routers(qwen2_family, tmp_path):
    fam = qwen2_family
    shared = (["the quick brown fox jumps over the lazy dog"], [])
    config = tmp_path / "qwen.yml"
    config.write_text(moe_yaml(fam["base"], {n: fam[n] for n in PROMPTS}, "hidden",
                               f"shared_experts:\n  - source_model: {fam['base']}\n"
                               f"    positive_prompts: {json.dumps(shared[0])}\n",
                               {"code": {"residual_scale": 0.5}}))
    assert moe(config, tmp_path / "out", "--scheduler", "sync") == 0
    assert_routes(tmp_path / "out", "Qwen2MoeForCausalLM", 3)
    got, base, code = tensors(tmp_path / "out"), tensors(fam["base"]), tensors(fam["code"])
    vectors = torch.stack(expected_hidden(fam["base"], [PROMPTS[n] for n in PROMPTS] + [shared]), dim=1)
    for layer in range(4):
        p = f"model.layers.{layer}."
        assert torch.equal(got[p + "mlp.gate.weight"], vectors[layer, :3])
        assert torch.equal(got[p + "mlp.shared_expert_gate.weight"], vectors[layer, 3:])
        assert torch.equal(got[p + "self_attn.q_proj.bias"], base[p + "self_attn.q_proj.bias"])
        assert torch.equal(got[p + "mlp.shared_expert.up_proj.weight"], base[p + "mlp.up_proj.weight"])
        assert torch.equal(got[p + "mlp.experts.1.up_proj.weight"], code[p + "mlp.up_proj.weight"])
        assert torch.equal(got[p + "mlp.experts.1.down_proj.weight"], code[p + "mlp.down_proj.weight"] * 0.5)


def test_qwen2_moe_of_llama_models_gets_zero_attention_biases(tmp_path):
    config = tmp_path / "qwen.yml"
    config.write_text(moe_yaml(EXAMPLES / "base", {n: EXAMPLES / n for n in PROMPTS}, "random",
                               f"shared_experts:\n  - source_model: {EXAMPLES / 'math'}\narchitecture: qwen\n"))
    assert moe(config, tmp_path / "out", "--scheduler", "sync") == 0
    got = tensors(tmp_path / "out")
    assert torch.equal(got["model.layers.0.self_attn.k_proj.bias"], torch.zeros(32, dtype=torch.bfloat16))
    assert got["model.layers.3.self_attn.q_proj.bias"].shape == (64,)
    assert torch.equal(got["model.layers.2.mlp.shared_expert.gate_proj.weight"],
                       tensors(EXAMPLES / "math")["model.layers.2.mlp.gate_proj.weight"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["Qwen2MoeForCausalLM"]


def test_qwen3_moe_loads_and_routes(tmp_path):
    with pytest.MonkeyPatch.context() as mp:  # mergeflow.testing builds no Qwen3 models by itself
        mp.setitem(testing.FAMILIES, "qwen3", ("Qwen3Config", "Qwen3ForCausalLM"))
        fam = testing.make_family(tmp_path / "qwen3", family="qwen3", seed=7, finetunes=list(PROMPTS))
    config = tmp_path / "qwen3.yml"
    config.write_text(moe_yaml(fam["base"], {n: fam[n] for n in PROMPTS}, "cheap_embed"))
    assert moe(config, tmp_path / "out", "--scheduler", "sync") == 0
    assert_routes(tmp_path / "out", "Qwen3MoeForCausalLM", 3)
    got = tensors(tmp_path / "out")
    assert torch.equal(got["model.layers.1.self_attn.q_norm.weight"],
                       tensors(fam["base"])["model.layers.1.self_attn.q_norm.weight"])


def test_random_routers_and_noise_are_the_same_bytes_on_every_scheduler(tmp_path):
    config = tmp_path / "random.yml"
    config.write_text(moe_yaml(EXAMPLES / "base", {n: EXAMPLES / n for n in PROMPTS}, "random", "",
                               {"math": {"noise_scale": 0.01, "residual_scale": 0.9}}))
    assert moe(config, tmp_path / "sync", "--scheduler", "sync", "--random-seed", "3") == 0
    assert moe(config, tmp_path / "dist", "--random-seed", "3") == 0
    assert moe(config, tmp_path / "threads", "--scheduler", "threads", "--random-seed", "3") == 0
    assert snapshot(tmp_path / "sync") == snapshot(tmp_path / "dist") == snapshot(tmp_path / "threads")
    got = tensors(tmp_path / "sync")
    routers = torch.stack([got[f"model.layers.{i}.mlp.gate.weight"] for i in range(4)]).float()
    assert routers.shape == (4, 3, 64)  # N(0, 1), as mergekit's torch.randn
    assert abs(routers.mean()) < 0.1 and abs(routers.std() - 1) < 0.08
    math_ = tensors(EXAMPLES / "math")["model.layers.0.mlp.gate_proj.weight"].float()
    noise = (got["model.layers.0.mlp.experts.gate_up_proj"][2, :128].float() - math_) / 0.01
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05
    down = got["model.layers.0.mlp.experts.down_proj"][2].float()
    plain = tensors(EXAMPLES / "math")["model.layers.0.mlp.down_proj.weight"].float() * 0.9
    assert abs(((down - plain) / 0.009).std() - 1) < 0.05  # noise, then residual_scale (not 1.11)
    assert torch.equal(got["model.layers.0.mlp.experts.gate_up_proj"][0],  # no noise elsewhere
                       torch.cat([tensors(EXAMPLES / "instruct")[f"model.layers.0.mlp.{p}.weight"]
                                  for p in ("gate_proj", "up_proj")]))


def test_an_interrupted_moe_resumes_to_the_same_bytes(mixtral, tmp_path, monkeypatch):
    """The 20th part write is torn (half its bytes) by a full disk; --resume finishes it."""
    import mergeflow.exec.moe as moe_tasks
    import mergeflow.exec.tasks as engine_tasks

    config, reference = mixtral
    real, count = engine_tasks.write_at, [0]

    def write_at(path, offset, data):
        count[0] += 1
        if count[0] == 20:
            real(path, offset, memoryview(data).cast("B")[: len(memoryview(data).cast("B")) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, offset, data)

    monkeypatch.setattr(engine_tasks, "write_at", write_at)
    monkeypatch.setattr(moe_tasks, "write_at", write_at)
    out = tmp_path / "out"
    assert moe(config, out, "--scheduler", "sync") == 2
    assert not (out / "config.json").exists()
    plan = plan_moe(load_moe_config(config))
    finished, _ = read_journal(out, plan.fingerprint)
    assert 19 <= len(finished) < len(plan.parts)
    monkeypatch.setattr(engine_tasks, "write_at", real)
    monkeypatch.setattr(moe_tasks, "write_at", real)
    assert moe(config, out, "--scheduler", "sync", "--resume") == 0
    assert snapshot(out) == snapshot(reference)


def test_bad_input_is_one_located_paragraph(tmp_path, capsys):
    config = tmp_path / "bad.yml"
    config.write_text(f"base_model: {EXAMPLES / 'base'}\ngate_mode: cheap_embd\nexperts:\n"
                      f"  - source_model: {EXAMPLES / 'code'}\n")
    assert moe(config, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{config}:2:1: unknown gate_mode `cheap_embd` (did you mean `cheap_embed`?)" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.skipif(__import__("importlib").util.find_spec("bitsandbytes") is not None,
                    reason="bitsandbytes is installed")
def test_quantized_hidden_states_need_bitsandbytes(mixtral, tmp_path, capsys):
    config = tmp_path / "hidden.yml"
    config.write_text(mixtral[0].read_text().replace("cheap_embed", "hidden"))
    assert moe(config, tmp_path / "out", "--load-in-4bit") == 2
    assert "--load-in-4bit: loading the base quantized needs bitsandbytes" in capsys.readouterr().err
    assert moe(mixtral[0], tmp_path / "out", "--load-in-8bit", "--scheduler", "sync") == 0
    assert "--load-in-8bit has no effect with gate_mode cheap_embed" in capsys.readouterr().err


def test_mergekit_flags_are_accepted(mixtral, tmp_path):
    assert moe(mixtral[0], tmp_path / "out", "--scheduler", "sync", "--lazy-unpickle", "--async-write",
               "-j", "2", "--no-copy-tokenizer", "--no-write-model-card", "--clone-tensors") == 0
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert files == {"config.json", "model.safetensors", "generation_config.json"}
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (mixtral[1] / "model.safetensors").read_bytes()


@pytest.mark.parametrize("config", sorted((ROOT / "configs" / "moe").glob("*.yml")), ids=lambda p: p.stem)
def test_example_moe_configs_run(config, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # example model paths are relative to the repository root
    assert moe(config, tmp_path / "out", "--scheduler", "sync") == 0
    arch = json.loads((tmp_path / "out" / "config.json").read_text())["architectures"]
    assert arch == [{"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}[config.stem]]
