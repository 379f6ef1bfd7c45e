"""Config parsing: the mergekit schema read unchanged, every problem located and reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergeflow.errors import ConfigError
from mergeflow.spec.config import ModelRef, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "cfg.yml")
    return err.value.problems


def test_full_mergekit_config_parses():
    cfg = parse_config("""
merge_method: ties
base_model: org/base@v1
models:
  - model: org/base@v1
  - model: ./ft1
    parameters:
      weight: [{filter: mlp, value: 0.7}, {value: 0.2}]
      density: 0.5
  - model:
      model: {path: ./ft2, revision: main}
      lora: ./adapter
    parameters:
      weight: 0.5
      density: [0.2, 0.8]
parameters:
  normalize: true
  lambda: 1.0
dtype: bfloat16
out_dtype: float16
tokenizer:
  source: union
  tokens:
    <|im_start|>: {source: ./ft1, force: true}
    <|im_end|>: {source: {kind: zero}}
  pad_to_multiple_of: 64
chat_template: chatml
""", "cfg.yml")
    assert cfg.base_model == ModelRef("org/base", "v1")
    assert cfg.models[2].model == ModelRef("./ft2", "main", "./adapter")
    assert cfg.tokenizer.pad_to_multiple_of == 64
    assert cfg.where(("models", 1, "parameters", "density")).startswith("cfg.yml:9:")


def test_model_reference_forms():
    assert ModelRef.parse("org/name") == ModelRef("org/name")
    assert ModelRef.parse("org/name@abc123") == ModelRef("org/name", "abc123")
    assert ModelRef.parse("org/name+org/lora") == ModelRef("org/name", None, "org/lora")
    assert str(ModelRef.parse("org/name@r+l")) == "org/name@r+l"
    with pytest.raises(ValueError, match="more than one"):
        ModelRef.parse("a@b@c")


def test_every_problem_is_reported_at_once_with_line_and_column():
    found = problems("""merge_method: linar
models:
  - model: a
    parameters: {weight: 1}
    paramters: {}
dtype: bfloat17
""")
    assert len(found) == 3
    assert found[0].startswith("cfg.yml:1:1: unknown merge_method `linar` (did you mean `linear`?)")
    assert found[1].startswith("cfg.yml:5:5: unknown key `paramters` (did you mean `parameters`?)")
    assert found[2].startswith("cfg.yml:6:1: unknown dtype `bfloat17` (did you mean `bfloat16`?)")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("merge_method: linear\n", "nothing to merge"),
        ("models: [{model: a, parameters: {weight: 1}}]\n", "`merge_method` is required"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n"
         "slices: [{sources: [{model: a, layer_range: [0, 2]}]}]\n", "give exactly one of `models`, `slices` or `modules`"),
        ("merge_method: passthrough\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 4]}\n"
         "      - {model: b, layer_range: [0, 3]}\n", "uneven layer counts [4, 3]"),
        ("merge_method: passthrough\nslices:\n  - sources:\n      - {model: a, layer_range: [4, 2]}\n",
         "layer_range [4, 2] is empty"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {wieght: 1}}]\n",
         "`wieght` is not a parameter of linear (did you mean `weight`?)"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {weight: abc}}]\n",
         "a parameter value is a number"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\nparameters: {normalize: 3}\n",
         "normalize must be true or false"),
        ("merge_method: passthrough\nmodels: [{model: a}, {model: b}]\n",
         "passthrough takes at most 1 model(s), got 2"),
        ("merge_method: linear\nmodules: {text_decoder: {}}\n",
         "module `text_decoder` needs exactly one of `models:` or `slices:`"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\ntokenizer: {pad_to_multiple_of: 0}\n",
         "tokenizer.pad_to_multiple_of"),
        ("merge_method: [linear\n", "not valid YAML"),
        ("- a\n- b\n", "a merge config is a YAML mapping"),
    ],
)
def test_rejected_configs(text, expected):
    assert any(expected in p for p in problems(text)), problems(text)


def test_method_declarations_drive_validation():
    found = problems("merge_method: ties\nbase_model: a\nmodels: [{model: a}, {model: b, parameters: "
                     "{weight: 1, density: -0.5}}]\n")
    assert found == ["cfg.yml:3:57: density must be > 0, got -0.5"]


def test_example_configs_validate():
    configs = sorted((ROOT / "configs").glob("*.yml"))
    assert configs, "configs/ holds the example configs"
    for path in configs:
        load_config(path)  # raises ConfigError with every problem
