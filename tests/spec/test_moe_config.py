"""mergekit-moe configs: the schema read unchanged, mergekit-moe's rules, every problem located."""

from __future__ import annotations

import pytest

from mergeflow.errors import ConfigError
from mergeflow.spec.config import ModelRef
from mergeflow.spec.moe import parse_moe_config


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_moe_config(text, "moe.yml")
    return err.value.problems


def test_full_mergekit_moe_config_parses():
    cfg = parse_moe_config("""
base_model: org/base@v2
gate_mode: hidden
dtype: bfloat16
experts_per_token: 1
architecture: qwen
experts:
  - source_model: org/chat
    positive_prompts: ["hi", "how are you"]
    negative_prompts: ["def f():"]
    noise_scale: 0.01
  - source_model:
      model: {path: ./code, revision: main}
      lora: ./adapter
    positive_prompts: ["def f():"]
    residual_scale: 0.5
shared_experts:
  - source_model: org/base@v2
    positive_prompts: ["anything"]
""", "moe.yml")
    assert cfg.base_model == ModelRef("org/base", "v2")
    assert cfg.experts[1].source_model == ModelRef("./code", "main", "./adapter")
    assert cfg.experts[0].prompts() == (("hi", "how are you"), ("def f():",))
    assert (cfg.experts[0].noise_scale, cfg.experts[1].residual_scale, cfg.experts_per_token) == (0.01, 0.5, 1)
    assert cfg.shared_experts[0].source_model == cfg.base_model
    assert cfg.warnings == ()
    assert cfg.where(("experts", 1, "source_model")) == "moe.yml:12:5"
    assert [loc for loc, _ in cfg.model_refs()] == [("base_model",), ("experts", 0, "source_model"),
                                                     ("experts", 1, "source_model"),
                                                     ("shared_experts", 0, "source_model")]


def test_defaults_are_mergekits():
    cfg = parse_moe_config("base_model: b\nexperts:\n  - {source_model: x, positive_prompts: [a]}\n"
                           "  - {source_model: y, positive_prompts: [b]}\n")
    assert (cfg.gate_mode, cfg.experts_per_token, cfg.dtype, cfg.shared_experts, cfg.architecture) == \
        ("hidden", 2, None, None, None)


def test_unknown_keys_are_warnings_as_mergekit_ignores_them():
    cfg = parse_moe_config("base_model: b\ngate_mode: random\nexpert_per_token: 2\nexperts:\n"
                           "  - {source_model: x, noise_scal: 0.1}\n  - {source_model: y}\n", "moe.yml")
    assert cfg.warnings == (
        "moe.yml:3:1: unknown key `expert_per_token` (did you mean `experts_per_token`?); mergekit-moe "
        "ignores it, and so does mergeflow",
        "moe.yml:5:23: unknown key `noise_scal` (did you mean `noise_scale`?); mergekit-moe ignores it, "
        "and so does mergeflow")
    assert cfg.experts[0].noise_scale is None


def test_every_problem_is_reported_at_once_with_its_place():
    assert problems("""gate_mod: random
gate_mode: hiden
dtype: bf17
experts_per_token: 3
experts:
  - source_model: a
    positive_prompts: [hi]
    noise_scale: loud
  - source_model: b
shared_experts:
  - {source_model: c, positive_prompts: [x]}
  - {source_model: d}
""") == [
        "moe.yml:1:1: `base_model` is required",
        "moe.yml:1:1: unknown key `gate_mod` (did you mean `gate_mode`?); mergekit-moe ignores it, and so "
        "does mergeflow",
        "moe.yml:2:1: unknown gate_mode `hiden` (did you mean `hidden`?); use one of hidden, cheap_embed, "
        "random, uniform_random",
        "moe.yml:3:1: unknown dtype `bf17`",
        "moe.yml:5:1: 2 expert(s) but experts_per_token is 3; list at least as many experts as each token "
        "is routed to",
        "moe.yml:8:5: `experts.0.noise_scale`: Input should be a valid number, unable to parse string as a number",
        "moe.yml:10:1: give `positive_prompts` to every shared expert or to none",
    ]


def test_prompted_gate_modes_need_distinct_prompts_for_every_expert():
    experts = "experts:\n  - {source_model: a, positive_prompts: [x]}\n  - {source_model: b}\n"
    for mode in ("hidden", "cheap_embed", "uniform_random"):  # mergekit asks for them but for `random`
        assert problems(f"base_model: m\ngate_mode: {mode}\n{experts}") == [
            f"moe.yml:5:5: expert 1 has no `positive_prompts`; with gate_mode {mode} each expert needs "
            "prompts of what should be routed to it (only gate_mode random needs none)"]
    parse_moe_config(f"base_model: m\ngate_mode: random\n{experts}")
    same = "experts:\n  - {source_model: a, positive_prompts: [x]}\n  - {source_model: b, positive_prompts: [x]}\n"
    assert problems(f"base_model: m\n{same}") == [
        "moe.yml:2:1: the positive and negative prompts are the same for every expert, which cannot give "
        "a working router; give each expert prompts of what should be routed to it"]


def test_experts_per_token_is_at_least_one():
    assert problems("base_model: m\ngate_mode: random\nexperts_per_token: 0\nexperts:\n  - {source_model: a}\n") == [
        "moe.yml:3:1: experts_per_token must be at least 1"]


def test_a_config_that_is_not_a_mapping():
    assert problems("- base_model: m\n") == [
        "moe.yml:1:1: a mergekit-moe config is a YAML mapping with `base_model` and `experts`"]
