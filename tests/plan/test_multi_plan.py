"""Planning a multi-stage merge from headers alone: stages refer to earlier results by name,
layer renumbering and tokenizers propagate, problems name the document and its line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergeflow.errors import MergeflowError
from mergeflow.plan.multi import plan_multi, stage_files
from mergeflow.sources.stage import StageModel
from mergeflow.spec.multi import load_multi
from mergeflow.testing import TokenizerSpec, make_model

FRANKEN = """name: s1
merge_method: passthrough
slices:
  - sources: [{{model: {base}, layer_range: [0, 2]}}]
  - sources: [{{model: {a}, layer_range: [1, 4]}}]
---
merge_method: passthrough
slices:
  - sources: [{{model: s1, layer_range: [{start}, {end}]}}]
"""


def plan_text(tmp_path: Path, text: str, **options):
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "multi.yml"
    path.write_text(text)
    options.setdefault("out_dir", tmp_path / "out")
    return plan_multi(load_multi(path), tmp_path / "work", **options), path


def error(tmp_path: Path, text: str, **options) -> str:
    with pytest.raises(MergeflowError) as err:
        plan_text(tmp_path, text, **options)
    return str(err.value)


def test_layers_renumbered_by_a_stage_are_what_the_next_one_reads(family, tmp_path):
    multi, _ = plan_text(tmp_path, FRANKEN.format(start=3, end=5, **family))
    s1, out = multi.stages
    assert (s1.name, s1.out_dir, out.out_dir) == ("s1", None, (tmp_path / "out").resolve())
    assert s1.plan.out_config["num_hidden_layers"] == 5 and out.plan.out_config["num_hidden_layers"] == 2
    down = {t.name: t for t in out.plan.tensors}["model.layers.0.mlp.down_proj.weight"]
    (inp,) = down.inputs
    assert (inp.stage.name, inp.stage.tensor.name) == ("s1", "model.layers.3.mlp.down_proj.weight")
    (first,) = inp.stage.tensor.inputs  # s1's layer 3 is a's layer 2
    assert (str(s1.plan.models[first.model].path), first.tensor.name) == (str(family["a"]),
                                                                            "model.layers.2.mlp.down_proj.weight")
    model = out.plan.models[inp.model]
    assert isinstance(model, StageModel) and model.label == "s1" and model.files() == []
    assert {n: (t.shape, t.dtype) for n, t in model.tensors.items()} == {
        t.name: (t.shape, "BF16") for t in s1.plan.tensors}


def test_a_layer_range_beyond_the_stage_names_the_document(family, tmp_path):
    msg = error(tmp_path, FRANKEN.format(start=3, end=6, **family))
    assert msg.startswith("the unnamed output (document 2, ")
    assert (f"{tmp_path / 'multi.yml'}:9:27: layer_range [3, 6] goes beyond s1, which has 5 layers (0..4)"
            in msg)


UNION = """name: s1
merge_method: linear
models:
  - {{model: {base}, parameters: {{weight: 0.5}}}}
  - {{model: {ext}, parameters: {{weight: 0.5}}}}
tokenizer_source: union
---
merge_method: linear
models:
  - {{model: s1, parameters: {{weight: 0.5}}}}
  - {{model: {a}, parameters: {{weight: 0.5}}}}
{tokenizer}"""


@pytest.fixture(scope="module")
def ext(family, tmp_path_factory) -> Path:
    """A fine-tune of the family's base with 16 more BPE tokens (400)."""
    return make_model(tmp_path_factory.mktemp("ext") / "ext", seed=4, base=family["base"],
                      tokenizer=TokenizerSpec(vocab_size=400))


def test_a_stage_tokenizer_is_what_the_next_stage_sees(family, ext, tmp_path):
    multi, _ = plan_text(tmp_path, UNION.format(ext=ext, tokenizer="tokenizer_source: union\n", **family))
    s1, out = multi.stages
    assert s1.plan.out_config["vocab_size"] == 400 and out.plan.out_config["vocab_size"] == 400
    files = {n: d for n, d in s1.plan.tokenizer.files}
    assert (tmp_path / "work" / "s1" / "tokenizer.json").read_bytes() == files["tokenizer.json"]
    assert json.loads((tmp_path / "work" / "s1" / "config.json").read_text()) == s1.plan.out_config
    assert stage_files(s1.plan)["tokenizer.json"] == files["tokenizer.json"]
    embed = {t.name: t for t in out.plan.tensors}["model.embed_tokens.weight"]
    assert embed.shape[0] == 400 and embed.vocab is not None and embed.inputs[0].stage.name == "s1"


def test_vocabularies_that_do_not_line_up_name_the_document(family, ext, tmp_path):
    msg = error(tmp_path, UNION.format(ext=ext, tokenizer="", **family))
    assert msg.startswith("the unnamed output (document 2, ")
    assert (f"{tmp_path / 'multi.yml'}:9:1: merge of model.embed_tokens.weight: the models' vocabularies "
            f"differ in size (s1: 400x64, {family['a']}: 384x64). Set `tokenizer_source: union`") in msg


def test_a_stage_as_tokenizer_source(family, ext, tmp_path):
    text = UNION.format(ext=ext, tokenizer="", **family).replace("model: s1,", f"model: {family['b']},")
    multi, _ = plan_text(tmp_path, text + "tokenizer_source: s1\n")
    assert [s.name for s in multi.stages] == ["s1", None]  # read only for its tokenizer
    assert multi.output.plan.out_config["vocab_size"] == 400
    assert multi.output.reads == ("s1",) and multi.output.plan.tokenizer.rows == 400


CYCLE = """name: a
merge_method: karcher
models: [{{model: b}}, {{model: {base}}}]
---
name: b
merge_method: karcher
models: [{{model: a}}, {{model: {base}}}]
---
merge_method: karcher
models: [{{model: b}}, {{model: {base}}}]
"""


def test_a_cycle_is_an_error_at_the_reference_that_closes_it(family, tmp_path):
    msg = error(tmp_path, CYCLE.format(**family))
    path = tmp_path / "multi.yml"
    assert msg == (f"{path}: 1 problem(s) with the stages (no model was read):\n"
                   f"  - {path}:7:11: stage `a` is read by a stage it reads itself (`a` -> `b` -> `a`): a "
                   "cycle; each stage may only read stages that do not read it")
    self_ref = CYCLE.format(**family).replace("models: [{model: b}", "models: [{model: a}", 1)
    assert "(`a` -> `a`): a cycle" in error(tmp_path, self_ref)


def test_unknown_names(family, tmp_path):
    path = tmp_path / "multi.yml"
    text = FRANKEN.format(start=0, end=2, **family)
    assert error(tmp_path, text.replace("model: s1", "model: s11")) == (
        f"{path}: 1 problem(s) with the stages (no model was read):\n"
        f"  - {path}:9:16: `s11` is neither a stage of this file (its stages: `s1`) nor a model directory; "
        "did you mean `s1`?")
    assert error(tmp_path, text.replace("model: s1", "model: zzz")).endswith(
        "`zzz` is neither a stage of this file (its stages: `s1`) nor a model directory")
    assert error(tmp_path, text.replace("model: s1", "model: s1@main")).endswith(
        "`s1@main` names stage `s1` with a revision; a stage's result has none: write `s1`")
    assert error(tmp_path, text.replace("model: s1", "model: s1+org/lora")).endswith(
        "`s1+org/lora` applies an adapter to stage `s1`, whose tensors are computed in the graph; give "
        "--intermediate-dir to write the stage so its tensors are files the adapter can be applied to")


def test_outputs_and_unused_stages(family, tmp_path):
    text = FRANKEN.format(start=0, end=2, **family)
    unused = text + "---\nname: spare\nmerge_method: passthrough\nmodels: [{model: " + str(family["b"]) + "}]\n"
    path = tmp_path / "multi.yml"
    with pytest.raises(MergeflowError, match="^give the output directory OUT"):
        plan_text(tmp_path, text, out_dir=None)
    with pytest.raises(MergeflowError) as err:
        plan_text(tmp_path, text, out_dir=None, intermediate_dir=tmp_path / "inter")
    assert str(err.value) == (f"the unnamed output (document 2, {path}:7) has no name, so it needs an output "
                              "directory: give OUT (or --out-path), as mergekit-multi needs --out-path")
    multi, _ = plan_text(tmp_path, unused)  # `spare` is the last document but the unnamed one is the output
    assert [s.name for s in multi.stages] == ["s1", None]
    assert multi.warnings[-1] == (f"stage `spare` (document 3, {path}:11) is not read by the output and is "
                                  "not merged; give --intermediate-dir to write every stage")
    multi, _ = plan_text(tmp_path, unused, intermediate_dir=tmp_path / "inter")
    inter = (tmp_path / "inter").resolve()
    assert [(s.name, s.out_dir) for s in multi.stages] == [
        ("s1", inter / "s1"), (None, (tmp_path / "out").resolve()), ("spare", inter / "spare")]
    down = multi.output.plan.tensors[3].inputs[0]
    assert down.stage is None and down.tensor.file == str(inter / "s1" / "model.safetensors")


def test_the_fingerprint_covers_every_stage_and_not_the_workdir(family, tmp_path):
    text = UNION.format(ext=family["b"], tokenizer="", **family)
    first, _ = plan_text(tmp_path / "one", text)
    again, _ = plan_text(tmp_path / "two", text)
    changed, _ = plan_text(tmp_path / "three", text.replace("weight: 0.5}}\n  - {model: " + str(family["b"]),
                                                           "weight: 0.4}}\n  - {model: " + str(family["b"]), 1))
    written, _ = plan_text(tmp_path / "four", text, intermediate_dir=tmp_path / "inter")
    fingerprints = [m.output.plan.fingerprint for m in (first, again, changed, written)]
    assert fingerprints[0] == fingerprints[1]
    assert len(set(fingerprints)) == 3
    # the output's own tensors are the same: only stage s1 changed
    assert [t.params for t in first.output.plan.tensors] == [t.params for t in changed.output.plan.tensors]
