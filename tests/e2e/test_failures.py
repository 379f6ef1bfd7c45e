"""Bad inputs and failures: exit code 2, a clear message, and no output that looks complete.

A table of cases (CASES), each a bad config, a damaged or incompatible model, or a bad output
directory, run through the CLI in-process (`mergeflow.cli.main`, sync scheduler). Each case
asserts exit code 2, the key words of its message, no traceback, that nothing outside the
output directory changed (every file's bytes and mtime, every link), and that the output
directory is as it was, or, for a failure found while merging (`late`), holds neither
config.json nor an index. A few run as a real subprocess to prove that nothing but the
message reaches the terminal.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from badinputs import (
    LAYER1_UP,
    Custom,
    RunsCode,
    append,
    change_tensors,
    copy_model,
    deeply_nested,
    drop_entry,
    edit_header,
    edit_json,
    fifo_in_place_of,
    offsets,
    raw_header,
    replace_with_bin,
    set_header_length,
    split_header,
    truncate,
    weights,
    write_header,
)
from safetensors.torch import load_file

from mergeflow.cli import main
from mergeflow.testing import TokenizerSpec, make_model


@pytest.fixture(scope="module")
def zoo(family, tmp_path_factory) -> dict[str, Path]:
    """The family plus models that do not fit it: more layers, another architecture, sharded,
    a larger vocabulary (400 tokens, the family has 384)."""
    root = tmp_path_factory.mktemp("zoo")
    return {**family,
            "deep": make_model(root / "deep", seed=5, layers=6),
            "mistral": make_model(root / "mistral", seed=6, family="mistral"),
            "sharded": make_model(root / "sharded", seed=7, base=family["base"], shards=2),
            "big": make_model(root / "big", seed=8, base=family["base"], tokenizer=TokenizerSpec(vocab_size=400))}


@dataclass
class Env:
    """What a case's setup gets: the models, a scratch directory, the output path."""

    zoo: dict[str, Path]
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    out: Path = field(init=False)
    after_plan: list[Callable[[], None]] = field(default_factory=list)
    out_is_model: bool = False  # the output path is an input model: it must stay as it was

    def __post_init__(self):
        self.out = self.tmp / "out"

    def copy(self, name: str, as_name: str | None = None) -> Path:
        return copy_model(self.zoo[name], self.tmp / "models" / (as_name or name))

    def config(self, text: str) -> str:
        path = self.tmp / "merge.yml"
        path.write_text(text.format(**{k: str(v) for k, v in self.zoo.items()}))
        return str(path)

    def linear(self, a: Path | str, b: Path | str, extra: str = "") -> str:
        return self.config(f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: "
                           f"{{{{weight: 0.5}}}}\n  - model: {b}\n    parameters: {{{{weight: 0.5}}}}\n"
                           + extra)


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[Env], str | tuple]  # returns the config path, or (config, *extra args)
    expect: tuple[str, ...]  # key words of the message, in any order
    late: bool = False  # found while merging: OUT holds the partial merge (for --resume)


CASES: list[Case] = []


def case(id: str, *expect: str, late: bool = False):
    def register(setup):
        CASES.append(Case(id, setup, expect, late))
        return setup
    return register


LINEAR_AB = ("merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
             "  - model: {b}\n    parameters: {{weight: 0.5}}\n")

TIES_AB = ("merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {a}\n"
           "    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5, density: 0.5}}\n")


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _fifo(path: Path) -> str:
    os.mkfifo(path)
    return str(path)


# ---- configs ---------------------------------------------------------------------------

case("config-file-missing", "cannot read the config", "nope.yml")(
    lambda e: str(e.tmp / "nope.yml"))
case("yaml-syntax", "not valid YAML", "merge.yml:")(
    lambda e: e.config("merge_method: linear\nmodels: [{{model: {a}\n"))
case("yaml-not-a-mapping", "a merge config is a YAML mapping")(
    lambda e: e.config("- linear\n- {a}\n"))
case("unknown-key", "unknown key `modelz`", "did you mean `models`")(
    lambda e: e.config(LINEAR_AB.replace("models:", "modelz:")))
case("unknown-method", "unknown merge_method `lineer`", "did you mean `linear`")(
    lambda e: e.config(LINEAR_AB.replace("linear", "lineer")))
case("parameter-misspelt", "merge.yml:6:31:", "`densty` is not a parameter of ties", "did you mean `density`")(
    lambda e: e.config(TIES_AB.replace("density: 0.5}", "densty: 0.5}", 1)))
case("parameter-wrong-type", "models.1.parameters.weight", "a parameter value is a number")(
    lambda e: e.config(TIES_AB.replace("weight: 0.5,", "weight: heavy,", 1)))
case("parameter-bool-wrong", "normalize must be true or false")(
    lambda e: e.config(LINEAR_AB + "parameters: {{normalize: 3}}\n"))
case("parameter-out-of-range", "density must be > 0", "got -0.5")(
    lambda e: e.config(TIES_AB.replace("density: 0.5", "density: -0.5", 1)))
case("parameter-required-missing", "1 problem in the merge config", "linear needs `weight`", "for model")(
    lambda e: e.config(LINEAR_AB.replace("    parameters: {{weight: 0.5}}\n", "", 1)))
case("parameter-nan", "merge.yml:6:18:", "`weight` is NaN", "finite number")(
    lambda e: e.config(TIES_AB.replace("weight: 0.5,", "weight: .nan,", 1)))
case("parameter-inf", "`density` is infinite", "finite number")(
    lambda e: e.config(TIES_AB.replace("density: 0.5", "density: .inf", 1)))
case("parameter-t-nan", "`t` is NaN")(
    lambda e: e.config("merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n"
                       "  - model: {a}\nparameters: {{t: .nan}}\n"))
case("gradient-empty", "`weight` is an empty list", "a gradient needs at least one number")(
    lambda e: e.config(LINEAR_AB.replace("weight: 0.5}", "weight: []}", 1)))
case("gradient-empty-in-a-filter", "filter entry whose value is an empty list")(
    lambda e: e.config(LINEAR_AB.replace("weight: 0.5}", "weight: [{{filter: mlp, value: []}}, {{value: 1}}]}", 1)))
case("duplicate-yaml-key", "merge.yml:2:", "duplicate key `merge_method` (first at line 1)")(
    lambda e: e.config("merge_method: linear\n" + LINEAR_AB))
case("models-and-slices", "give exactly one of `models`, `slices` or `modules`")(
    lambda e: e.config(LINEAR_AB + "slices:\n  - sources: [{{model: {a}, layer_range: [0, 4]}}]\n"))
case("model-listed-twice", "is listed twice in one merge", "Duplicate merge inputs")(
    lambda e: e.config(LINEAR_AB.replace("model: {b}", "model: {a}")))
case("model-with-two-adapters", "has 2 `+` signs", "at most one adapter")(
    lambda e: e.config(LINEAR_AB.replace("model: {b}", "model: {b}+x+y")))
case("tokenizer-source-misspelt", "tokenizer source `unoin`", "did you mean `union`")(
    lambda e: e.config(LINEAR_AB + "tokenizer_source: unoin\n"))
case("config-not-utf8", "merge.yml:1:", "not UTF-8", "save it as UTF-8")(
    lambda e: _write(e.tmp / "merge.yml", b"merge_method: linear # caf\xe9\n"))
case("config-billion-laughs", "expands to more than", "YAML nodes", "aliases")(
    lambda e: e.config("a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"{{c}}: &{{c}} [{', '.join(['*' + p] * 10)}]\n".format(c=c) for p, c in zip("abcde", "bcdef"))
        + "merge_method: linear\n"))
case("config-too-large", "larger than 2,000,000 bytes")(
    lambda e: e.config(LINEAR_AB + "# " + "x" * 2_100_000 + "\n"))
case("config-nested-deeply", "nested more than 64 levels deep")(
    lambda e: e.config(LINEAR_AB + "deep: " + "[" * 200 + "]" * 200 + "\n"))
case("config-is-a-fifo", "not a regular file")(
    lambda e: _fifo(e.tmp / "merge.yml"))
case("nothing-to-merge", "nothing to merge")(
    lambda e: e.config("merge_method: linear\ndtype: bfloat16\n"))
case("unknown-dtype", "unknown dtype `bfloat`", "did you mean `bfloat16`")(
    lambda e: e.config(LINEAR_AB + "dtype: bfloat\n"))
case("uneven-slices", "uneven layer counts [2, 3]")(
    lambda e: e.config("merge_method: linear\nslices:\n  - sources:\n"
                       "      - {{model: {a}, layer_range: [0, 2], parameters: {{weight: 1}}}}\n"
                       "      - {{model: {b}, layer_range: [0, 3], parameters: {{weight: 1}}}}\n"))
case("empty-layer-range", "layer_range [2, 2] is empty")(
    lambda e: e.config("merge_method: passthrough\nslices:\n"
                       "  - sources: [{{model: {a}, layer_range: [2, 2]}}]\n"))
case("base-model-absent", "ties needs a `base_model`")(
    lambda e: e.config(LINEAR_AB.replace("linear", "ties")))
case("too-many-inputs", "slerp takes at most 1 model(s) besides the base, got 2")(
    lambda e: e.config("merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n"
                       "  - model: {a}\n  - model: {b}\nparameters: {{t: 0.5}}\n"))
case("model-not-a-string", "a model is a string")(
    lambda e: e.config(LINEAR_AB.replace("model: {a}", "model: 5")))

# ---- models that cannot be found or read -------------------------------------------------


@case("model-path-missing", "no such directory", "merge.yml:3:")
def _(e):
    return e.linear(e.tmp / "nowhere" / "model", "{a}")


@case("model-path-is-a-file", "is a file", "a model is a directory")
def _(e):
    (e.tmp / "file").write_text("x")
    return e.linear("{a}", e.tmp / "file")


@case("directory-not-a-model", "holds no *.safetensors", "and no config.json", "not a Hugging Face model directory")
def _(e):
    (e.tmp / "empty").mkdir()
    return e.linear("{a}", e.tmp / "empty")


@case("config-json-broken", "cannot read", "config.json")
def _(e):
    model = e.copy("b")
    (model / "config.json").write_text("{not json")
    return e.linear("{a}", model)


@case("no-weight-files", "holds no *.safetensors or pytorch_model*.bin")
def _(e):
    model = e.copy("b")
    weights(model).unlink()
    return e.linear("{a}", model)


@case("hub-id-not-cached", "acme/missing", "not in the Hugging Face cache")
def _(e):
    e.monkeypatch.setenv("HF_HUB_CACHE", str(e.tmp / "hub"))
    e.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return e.linear("{a}", "acme/missing")


@case("lora-adapter-missing", "no-adapter", "no such directory")
def _(e):
    return e.linear("{a}", f"{e.zoo['b']}+{e.tmp / 'no-adapter'}")


@case("lora-adapter-for-another-shape", "adapter", "lora_A.weight [2, 32]",
      "do not make a delta of model.layers.0.self_attn.q_proj.weight's shape [64, 64]")
def _(e):
    from safetensors.torch import save_file

    adapter = e.tmp / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": torch.zeros(2, 32), f"{prefix}.lora_B.weight": torch.zeros(64, 2)},
              adapter / "adapter_model.safetensors")
    return e.linear("{a}", f"{e.zoo['b']}+{adapter}")


@case("weights-file-is-a-directory", "model.safetensors: cannot read it", "it is a directory")
def _(e):
    model = e.copy("b")
    weights(model).unlink()
    (model / "model.safetensors").mkdir()
    return e.linear("{a}", model)


@case("weights-file-dangling-link", "model.safetensors: cannot read it", "No such file")
def _(e):
    model = e.copy("b")
    weights(model).unlink()
    (model / "model.safetensors").symlink_to(e.tmp / "gone.safetensors")
    return e.linear("{a}", model)


@case("index-points-outside", "points outside the model directory", "../")
def _(e):
    model = e.copy("sharded")
    index = model / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = "../../escape.safetensors"
    index.write_text(json.dumps(data))
    return e.linear("{a}", model)


@case("index-lists-missing-shard", "model-00002-of-00002.safetensors", "which is missing")
def _(e):
    model = e.copy("sharded")
    (model / "model-00002-of-00002.safetensors").unlink()
    return e.linear("{a}", model)


@case("index-not-json", "model.safetensors.index.json: cannot read the index: not valid JSON")
def _(e):
    model = e.copy("sharded")
    (model / "model.safetensors.index.json").write_text("{")
    return e.linear("{a}", model)


# ---- incompatible models ------------------------------------------------------------------


@case("missing-tensor", f"has no tensor {LAYER1_UP}", "b-lacks")
def _(e):
    model = e.copy("b", "b-lacks")
    change_tensors(model, drop=(LAYER1_UP,))
    return e.linear("{a}", model)


@case("shape-mismatch", f"merge of {LAYER1_UP}: shapes differ", "128x64", "64x128", "b-turned")
def _(e):
    model = e.copy("b", "b-turned")
    change_tensors(model, transpose=(LAYER1_UP,))
    return e.linear("{a}", model)


case("different-layer-counts", "different layer counts", "use `slices:`")(
    lambda e: e.linear("{a}", "{deep}"))
case("layer-range-beyond-model", "layer_range [2, 6] goes beyond", "which has 4 layers")(
    lambda e: e.config("merge_method: passthrough\nslices:\n"
                       "  - sources: [{{model: {a}, layer_range: [2, 6]}}]\n"))
case("mixed-architectures", "different architectures", "MistralForCausalLM", "--allow-crimes")(
    lambda e: e.linear("{a}", "{mistral}"))
case("slice-base-not-among-sources", "ties needs the base model among this slice's sources")(
    lambda e: e.config("merge_method: ties\nbase_model: {base}\nslices:\n  - sources:\n"
                       "      - {{model: {a}, layer_range: [0, 4], parameters: {{weight: 1}}}}\n"
                       "      - {{model: {b}, layer_range: [0, 4], parameters: {{weight: 1}}}}\n"))

# ---- damaged files ------------------------------------------------------------------------


def _damaged(e: Env, damage: Callable[[Path], None]) -> str:
    model = e.copy("b", "damaged")
    damage(weights(model))
    return e.linear("{a}", model)


case("header-oversized", "damaged/model.safetensors", "corrupt safetensors header",
     "header length 1099511627776")(lambda e: _damaged(e, lambda f: set_header_length(f, 2**40)))
case("header-longer-than-file", "damaged/model.safetensors", "corrupt safetensors header")(
    lambda e: _damaged(e, lambda f: set_header_length(f, f.stat().st_size)))
case("header-not-json", "damaged/model.safetensors", "corrupt safetensors header: not valid JSON")(
    lambda e: _damaged(e, lambda f: write_header(f, b"{garbage" + b" " * 64, split_header(f)[1])))
case("header-not-an-object", "damaged/model.safetensors", "not a JSON object")(
    lambda e: _damaged(e, lambda f: write_header(f, [1, 2], split_header(f)[1])))
case("header-entry-no-dtype", "damaged/model.safetensors", "header entry for", LAYER1_UP)(
    lambda e: _damaged(e, lambda f: edit_header(f, LAYER1_UP, dtype=None)))
case("header-size-disagrees", "damaged/model.safetensors", f"tensor {LAYER1_UP} has")(
    lambda e: _damaged(e, lambda f: edit_header(f, LAYER1_UP, shape=[128, 32])))
case("header-unknown-dtype", "damaged/model.safetensors", LAYER1_UP, "dtype Q4")(
    lambda e: _damaged(e, lambda f: edit_header(f, LAYER1_UP, dtype="Q4")))
case("header-fp8-dtype", "damaged/model.safetensors", LAYER1_UP, "dtype F8_E4M3", "cannot read")(
    lambda e: _damaged(e, lambda f: edit_header(f, LAYER1_UP, dtype="F8_E4M3", shape=[128, 128])))
case("file-truncated", "damaged/model.safetensors", "truncated", "re-download")(
    lambda e: _damaged(e, lambda f: truncate(f, -1000)))
case("file-three-bytes", "damaged/model.safetensors", "truncated safetensors file (3 bytes")(
    lambda e: _damaged(e, lambda f: truncate(f, 3)))
case("file-empty", "damaged/model.safetensors", "truncated safetensors file (0 bytes")(
    lambda e: _damaged(e, lambda f: truncate(f, 0)))


# ---- damaged headers: every field and the layout of the data are checked --------------------

LAYER0_UP = LAYER1_UP.replace("layers.1", "layers.0")
FIX = "re-download or re-save this file"


def _same_offsets(f: Path) -> None:  # two tensors of one size claim the same bytes
    edit_header(f, LAYER1_UP, data_offsets=offsets(f)[LAYER0_UP])


case("header-offsets-overlap", "damaged/model.safetensors", f"tensor {LAYER1_UP}", "overlaps", LAYER0_UP, FIX)(
    lambda e: _damaged(e, _same_offsets))
case("header-offsets-into-the-header", "damaged/model.safetensors", LAYER1_UP, "data_offsets [-64, 16320]",
     "not a byte range")(lambda e: _damaged(e, lambda f: edit_header(f, LAYER1_UP, data_offsets=[-64, 16320])))
case("header-offsets-not-integers", "damaged/model.safetensors", LAYER1_UP, "not a list of two integers")(
    lambda e: _damaged(e, lambda f: edit_header(f, LAYER1_UP, data_offsets=["0", 16384.5])))
case("header-offsets-past-the-end", "damaged/model.safetensors", "truncated", "ends at byte")(
    lambda e: _damaged(e, lambda f: edit_header(f, LAYER1_UP, data_offsets=[10**9, 10**9 + 16384])))
case("header-shape-negative", "damaged/model.safetensors", LAYER1_UP, "shape [-128, -64]",
     "not a list of non-negative integers")(
    lambda e: _damaged(e, lambda f: edit_header(f, LAYER1_UP, shape=[-128, -64])))
case("header-shape-not-integers", "damaged/model.safetensors", LAYER1_UP, "shape [128.0, 64]")(
    lambda e: _damaged(e, lambda f: edit_header(f, LAYER1_UP, shape=[128.0, 64])))
case("header-shape-not-a-list", "damaged/model.safetensors", LAYER1_UP, "shape '128x64'")(
    lambda e: _damaged(e, lambda f: edit_header(f, LAYER1_UP, shape="128x64")))
case("header-dtype-not-a-string", "damaged/model.safetensors", LAYER1_UP, "dtype 16 is not a string")(
    lambda e: _damaged(e, lambda f: edit_header(f, LAYER1_UP, dtype=16)))
case("header-entry-not-an-object", "damaged/model.safetensors", LAYER1_UP, "not a JSON object")(
    lambda e: _damaged(e, lambda f: write_header(f, {**split_header(f)[0], LAYER1_UP: [1]}, split_header(f)[1])))
case("header-nested-100000-deep", "damaged/model.safetensors", "nested too deeply")(
    lambda e: _damaged(e, lambda f: raw_header(f, deeply_nested())))
case("header-name-twice", "damaged/model.safetensors", f"key '{LAYER1_UP}' appears twice")(
    lambda e: _damaged(e, lambda f: raw_header(f, _twice(f))))
case("header-metadata-not-strings", "damaged/model.safetensors", "`__metadata__` must map strings to strings",
     "'format'")(lambda e: _damaged(e, lambda f: write_header(f, {**split_header(f)[0], "__metadata__":
                                                                  {"format": 1}}, split_header(f)[1])))
case("header-not-utf8", "damaged/model.safetensors", "not UTF-8")(
    lambda e: _damaged(e, lambda f: raw_header(f, b'{"\xff": 1}')))
case("data-with-a-gap", "damaged/model.safetensors", "(after model.layers.0.mlp.gate_proj.weight) belong to no tensor")(
    lambda e: _damaged(e, lambda f: drop_entry(f, LAYER0_UP)))
case("data-with-bytes-appended", "damaged/model.safetensors", "8 bytes after the last tensor's data")(
    lambda e: _damaged(e, lambda f: append(f, b"\0" * 8)))


def _twice(f: Path) -> bytes:
    header, _ = split_header(f)
    text = json.dumps(header)
    entry = json.dumps({LAYER1_UP: header[LAYER1_UP]})[1:-1]
    return text[:-1].encode() + b", " + entry.encode() + b"}"


# ---- damaged configs and indexes, files that are not files ---------------------------------


def _model_with(e: Env, change: Callable[[Path], None], name: str = "b", as_name: str = "damaged") -> str:
    model = e.copy(name, as_name)
    change(model)
    return e.linear("{a}", model) if name == "b" else e.linear(model, "{b}")


case("config-json-not-an-object", "damaged/config.json", "not a JSON object (it is a JSON list)")(
    lambda e: _model_with(e, lambda m: (m / "config.json").write_text("[1, 2]")))
case("config-json-nested-100000-deep", "damaged/config.json", "nested too deeply")(
    lambda e: _model_with(e, lambda m: (m / "config.json").write_bytes(deeply_nested())))
case("config-json-not-utf8", "damaged/config.json", "not UTF-8")(
    lambda e: _model_with(e, lambda m: (m / "config.json").write_bytes(b'{"model_type": "\xffllama"}')))
case("config-json-architectures-not-a-list", "damaged/config.json", "`architectures` is 5")(
    lambda e: _model_with(e, lambda m: edit_json(m / "config.json", architectures=5)))
case("config-json-without-a-layer-count", "damaged/config.json", "has no layer count (`num_hidden_layers`",
     "its tensors have 4 layers", '"num_hidden_layers": 4')(
    lambda e: _model_with(e, lambda m: edit_json(m / "config.json", num_hidden_layers=None), "a"))
case("config-json-is-a-fifo", "damaged/config.json", "a FIFO (named pipe)", "must be a regular file")(
    lambda e: _model_with(e, lambda m: fifo_in_place_of(m / "config.json")))
case("weights-file-is-a-fifo", "damaged/model.safetensors", "a FIFO (named pipe)")(
    lambda e: _model_with(e, lambda m: fifo_in_place_of(weights(m))))
case("bin-file-is-a-fifo", "damaged/pytorch_model.bin", "a FIFO (named pipe)")(
    lambda e: _model_with(e, lambda m: (weights(m).unlink(), os.mkfifo(m / "pytorch_model.bin"))))


@case("model-path-is-a-symlink-loop", "loop", "is a symlink loop")
def _(e):
    (e.tmp / "loop").symlink_to(e.tmp / "loop")
    return e.linear("{a}", e.tmp / "loop")


@case("model-path-is-a-fifo", "pipe", "not a file or directory")
def _(e):
    os.mkfifo(e.tmp / "pipe")
    return e.linear("{a}", e.tmp / "pipe")


def _index(e: Env, change: Callable[[dict, Path], None]) -> str:
    model = e.copy("sharded")
    path = model / "model.safetensors.index.json"
    data = json.loads(path.read_text())
    change(data, model)
    path.write_text(json.dumps(data))
    return e.linear("{a}", model)


SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def _in_both_shards(data: dict, model: Path) -> None:
    name = next(n for n, f in data["weight_map"].items() if f == SHARD1)
    tensor = load_file(model / SHARD1)[name]
    change_tensors(model, file=model / SHARD2, add={name: tensor})


case("index-weight-map-missing", "model.safetensors.index.json is not a valid index", "`weight_map`")(
    lambda e: _index(e, lambda d, m: d.pop("weight_map")))


@case("index-not-an-object", "model.safetensors.index.json: cannot read the index: not a JSON object")
def _(e):
    model = e.copy("sharded")
    (model / "model.safetensors.index.json").write_text("[]")
    return e.linear("{a}", model)


case("index-weight-map-a-list", "`weight_map` must map every tensor name to the shard file")(
    lambda e: _index(e, lambda d, m: d.update(weight_map=list(d["weight_map"]))))
case("index-weight-map-not-strings", "`weight_map` must map every tensor name to the shard file")(
    lambda e: _index(e, lambda d, m: d["weight_map"].update({LAYER1_UP: 2})))
case("index-tensor-in-two-shards", "is in both", SHARD1, SHARD2, "a tensor must be stored once")(
    lambda e: _index(e, _in_both_shards))
case("index-names-the-wrong-shard", f"{SHARD2} holds tensor", f"lists it under {SHARD1}", "disagree")(
    lambda e: _index(e, lambda d, m: d["weight_map"].update(
        {next(n for n, f in d["weight_map"].items() if f == SHARD2): SHARD1})))
case("index-omits-a-tensor", "does not list it", "the index and its shards disagree")(
    lambda e: _index(e, lambda d, m: d["weight_map"].pop(LAYER1_UP)))
case("index-lists-a-tensor-no-shard-holds", "lists model.layers.9.mlp.up_proj.weight in", "no shard holds it")(
    lambda e: _index(e, lambda d, m: d["weight_map"].update({"model.layers.9.mlp.up_proj.weight": SHARD1})))
case("adapter-config-not-an-object", "adapter_config.json", "not a JSON object")(
    lambda e: e.linear("{a}", f"{e.zoo['b']}+{_adapter(e, '[2]')}"))
case("adapter-rank-not-a-number", "adapter", "needs a positive rank `r`", "r='2'")(
    lambda e: e.linear("{a}", f"{e.zoo['b']}+{_adapter(e, json.dumps({'r': '2', 'lora_alpha': 4}))}"))


def _adapter(e: Env, config: str) -> Path:
    adapter = e.tmp / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(config)
    return adapter


# ---- tensors that cannot be merged as they are ----------------------------------------------


case("integer-tensor-in-one-model", LAYER1_UP, "differs in dtype or shape", "I16 128x64", "BF16 128x64",
     "copied, never merged")(lambda e: _model_with(e, lambda m: change_tensors(m, to_int=(LAYER1_UP,))))
case("vocab-sizes-differ-without-a-tokenizer-setting", "merge of model.embed_tokens.weight",
     "vocabularies differ in size", "384x64", "400x64", "tokenizer_source: union", "--unsafe-truncate-embeddings")(
    lambda e: e.linear("{a}", "{big}"))
case("task-arithmetic-with-every-other-vocab-different", "2 problem(s)", "merge of model.embed_tokens.weight",
     "merge of lm_head.weight", "vocabularies differ in size", "--unsafe-truncate-embeddings")(
    lambda e: e.config("merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {big}\n"
                       "    parameters: {{weight: 1, density: 0.5}}\n"))


@case("bin-runs-code", "pytorch_model.bin", "not a weights-only PyTorch checkpoint, refused")
def _(e):
    model = e.copy("b", "evil")
    replace_with_bin(model, {"w": torch.zeros(2), "x": RunsCode(e.tmp / "pwned")})
    return e.linear("{a}", model)


@case("bin-raw-pickle-runs-code", "pytorch_model.bin", "refused")
def _(e):
    model = e.copy("b", "evil")
    replace_with_bin(model, {"w": RunsCode(e.tmp / "pwned")}, raw_pickle=True)
    return e.linear("{a}", model)


@case("bin-custom-class", "pytorch_model.bin", "refused", "convert it to safetensors")
def _(e):
    model = e.copy("b", "custom")
    replace_with_bin(model, {"w": torch.zeros(2), "meta": Custom()})
    return e.linear("{a}", model)


@case("bin-not-a-state-dict", "pytorch_model.bin", "not a state dict of tensors")
def _(e):
    model = e.copy("b", "list")
    replace_with_bin(model, [torch.zeros(2)])
    return e.linear("{a}", model)


@case("bin-complex-dtype", "pytorch_model.bin", "dtype complex64", "cannot read")
def _(e):
    model = e.copy("b", "complex")
    replace_with_bin(model, {LAYER1_UP: torch.zeros(128, 32, dtype=torch.complex64)})
    return e.linear("{a}", model)


@case("bin-garbage", "pytorch_model.bin", "refused")
def _(e):
    model = e.copy("b", "garbage")
    weights(model).unlink()
    (model / "pytorch_model.bin").write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)
    return e.linear("{a}", model)


# ---- damage found only while merging -------------------------------------------------------


@case("truncated-after-planning", "late/model.safetensors", "truncated", late=True)
def _(e):
    model = e.copy("b", "late")
    e.after_plan.append(lambda: truncate(weights(model), -5000))
    return e.linear("{a}", model)


@case("removed-after-planning", "late/model.safetensors", "cannot read tensor", late=True)
def _(e):
    model = e.copy("b", "late")
    e.after_plan.append(lambda: weights(model).unlink())
    return e.linear("{a}", model)


@case("nan-in-input", f"merge of {LAYER1_UP} (linear) produced", "NaN/Inf", late=True)
def _(e):
    model = e.copy("b", "nan")
    change_tensors(model, nan=(LAYER1_UP,))
    return e.linear("{a}", model)


@case("nan-over-an-old-model-with-force", "NaN/Inf", "holds no config.json", late=True)
def _(e):
    model = e.copy("b", "nan")
    change_tensors(model, nan=(LAYER1_UP,))
    copy_model(e.zoo["a"], e.out)  # a complete model from an earlier run: --force replaces it
    return e.linear("{a}", model), "--force"


# ---- the output directory -----------------------------------------------------------------


@case("out-is-an-input", "overlaps the input model")
def _(e):
    model = e.copy("a")
    e.out, e.out_is_model = model, True
    return e.linear(model, "{b}"), "--force"


@case("out-inside-an-input", "overlaps the input model")
def _(e):
    model = e.copy("a")
    e.out = model / "merged"
    return e.linear(model, "{b}")


@case("out-contains-an-input", "overlaps the input model")
def _(e):
    model = e.copy("a")
    e.out = model.parent
    return e.linear(model, "{b}"), "--force"


@case("out-is-a-link-to-an-input", "overlaps the input model")
def _(e):
    model = e.copy("a")
    e.out.symlink_to(model, target_is_directory=True)
    e.out_is_model = True
    return e.linear(model, "{b}"), "--force"


@case("out-not-empty", "is not empty", "--force", "--resume")
def _(e):
    e.out.mkdir()
    (e.out / "notes.txt").write_text("mine")
    return e.linear("{a}", "{b}")


@case("out-is-a-file", "exists and is not a directory")
def _(e):
    e.out.write_text("x")
    return e.linear("{a}", "{b}")


@case("out-under-a-file", "cannot create the output directory")
def _(e):
    (e.tmp / "file").write_text("x")
    e.out = e.tmp / "file" / "out"
    return e.linear("{a}", "{b}")


@case("resume-another-plan", "cannot resume", "plan fingerprint changed")
def _(e):
    (e.out / ".mergeflow").mkdir(parents=True)
    (e.out / ".mergeflow" / "journal").write_text("plan 0123456789abcdef\ndone x\n")
    return e.linear("{a}", "{b}"), "--resume"


@case("a-tensor-never-written", "output is incomplete", "1 tensor(s) were never written", late=True)
def _(e):
    from mergeflow.exec import tasks

    real = tasks.record_done

    def lose_one(journal, name):
        return None if name == LAYER1_UP else real(journal, name)
    e.monkeypatch.setattr(tasks, "record_done", lose_one)
    return e.linear("{a}", "{b}")


@case("shard-header-overwritten", "output is incomplete", "header differs from the plan", late=True)
def _(e):
    from mergeflow.exec import tasks

    real = tasks.finalize

    def clobber(path, size, *written):
        with open(path, "r+b") as f:
            f.seek(8)
            f.write(b"[")
        return real(path, size, *written)
    e.monkeypatch.setattr(tasks, "finalize", clobber)
    return e.linear("{a}", "{b}")


@case("no-cuda-device", "no CUDA device")
def _(e):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    return e.linear("{a}", "{b}"), "--device", "cuda"


def _run(env: Env, args: tuple | str, capsys) -> tuple[int, str]:
    config, *extra = (args,) if isinstance(args, str) else args
    import mergeflow.plan

    real = mergeflow.plan.plan_merge

    def plan_then_damage(*a, **kw):
        plan = real(*a, **kw)
        for hook in env.after_plan:
            hook()
        return plan
    env.monkeypatch.setattr(mergeflow.plan, "plan_merge", plan_then_damage)
    rc = main(["run", config, str(env.out), "--scheduler", "sync", "--quiet", *extra])
    return rc, capsys.readouterr().err


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _tree(root: Path, skip: Path | None = None) -> dict[str, tuple] | None:
    """Every entry under root (links not followed, FIFOs not opened): bytes and mtime of files,
    targets of links; None if root does not exist."""
    if not os.path.lexists(root):
        return None
    out: dict[str, tuple] = {}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if skip is None or Path(dirpath, d) != skip]
        for name in dirs + files:
            path = Path(dirpath, name)
            if skip is not None and path == skip:
                continue
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                out[str(path)] = ("file", path.read_bytes(), st.st_mtime_ns)
            elif stat.S_ISLNK(st.st_mode):
                out[str(path)] = ("link", os.readlink(path))
            else:
                out[str(path)] = (stat.S_IFMT(st.st_mode),)
    return out


def _outside(env: Env) -> dict[Path, dict | None]:
    """The test's own directory but OUT, and every shared input model."""
    roots = {env.tmp} | {p.parent for p in env.zoo.values()}
    return {root: _tree(root, skip=env.out) for root in sorted(roots)}


def test_the_corpus_is_big_enough():
    assert len(CASES) >= 80 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_a_clear_message(bad: Case, zoo, tmp_path, monkeypatch, capsys):
    env = Env(zoo, tmp_path, monkeypatch)
    args = bad.setup(env)
    before = _snapshot(env.out) if env.out_is_model else None
    outside, out_before = _outside(env), _tree(env.out)
    rc, err = _run(env, args, capsys)
    assert rc == 2, err
    for words in bad.expect:
        assert words in err, f"{words!r} not in:\n{err}"
    assert ("\n" + err).count("\nerror: ") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "pwned").exists()  # no pickle ran code
    if not env.after_plan:  # (those cases damage an input themselves)
        assert _outside(env) == outside, "something outside OUT changed"
    if before is not None:
        assert _snapshot(env.out) == before
    elif not bad.late:
        assert _tree(env.out) == out_before, "OUT changed though nothing was merged"
    for marker in ("config.json", "model.safetensors.index.json"):
        assert before is not None or not (env.out / marker).exists(), f"{marker} left in {env.out}"


# ---- the terminal, internal errors, security ----------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mergeflow.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_subprocess_refused_pickle_prints_only_the_message(zoo, tmp_path):
    env = Env(zoo, tmp_path, pytest.MonkeyPatch())
    model = env.copy("b", "evil")
    replace_with_bin(model, {"w": torch.zeros(2), "x": RunsCode(tmp_path / "pwned")})
    done = _cli("run", env.linear("{a}", model), str(env.out), "--quiet")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    assert "evil/pytorch_model.bin: not a weights-only PyTorch checkpoint, refused" in done.stderr
    assert "posix.system" in done.stderr  # the refused global is named
    assert not (tmp_path / "pwned").exists() and not env.out.exists()


def test_subprocess_worker_failure_on_the_default_scheduler(zoo, tmp_path):
    """A NaN found in a Dask worker of the default (distributed) scheduler: still one clean
    message naming the tensor, exit 2, and a dashboard that listened on 127.0.0.1 only."""
    env = Env(zoo, tmp_path, pytest.MonkeyPatch())
    model = env.copy("b", "nan")
    change_tensors(model, nan=(LAYER1_UP,))
    done = _cli("run", env.linear("{a}", model), str(env.out))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert f"error: merge of {LAYER1_UP} (linear) produced 8192 NaN/Inf values" in done.stderr
    assert "dashboard: http://127.0.0.1:" in done.stderr
    assert not (env.out / "config.json").exists()


def test_verbose_shows_the_traceback(zoo, tmp_path, monkeypatch, capsys):
    env = Env(zoo, tmp_path, monkeypatch)
    assert main(["run", env.linear("{a}", tmp_path / "nowhere"), str(env.out), "-v"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "MergeflowError" in err
    assert "error: " in err and "no such directory" in err


@pytest.mark.parametrize("verbose", [False, True])
def test_internal_error_exits_1_with_a_hint(zoo, tmp_path, monkeypatch, capsys, verbose):
    import mergeflow.plan

    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom")
    monkeypatch.setattr(mergeflow.plan, "plan_merge", broken)
    env = Env(zoo, tmp_path, monkeypatch)
    rc = main(["run", env.linear("{a}", "{b}"), str(env.out), *(["-v"] if verbose else [])])
    err = capsys.readouterr().err
    assert rc == 1
    assert "error: internal error: ZeroDivisionError: boom" in err and "bug in mergeflow" in err
    assert ("Traceback" in err) == verbose and ("rerun with -v" in err) == (not verbose)


def test_os_error_is_the_users_to_fix(zoo, tmp_path, monkeypatch, capsys):
    import mergeflow.plan

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/models/secret")
    monkeypatch.setattr(mergeflow.plan, "plan_merge", denied)
    env = Env(zoo, tmp_path, monkeypatch)
    assert main(["validate", env.linear("{a}", "{b}")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Permission denied: /models/secret") and "Traceback" not in err


def test_legacy_bin_checkpoint_is_read_weights_only(zoo, tmp_path):
    from mergeflow.sources.models import read_bin_header

    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(3, 2)}, path, _use_new_zipfile_serialization=False)
    info = read_bin_header(path)["w"]
    assert (info.dtype, info.shape) == ("F32", (3, 2))


def test_nothing_loads_remote_code_unasked():
    """Every from_pretrained / AutoX call in the package passes trust_remote_code explicitly,
    and never a literal True (it must come from --trust-remote-code)."""
    import ast

    import mergeflow

    root = Path(mergeflow.__file__).parent
    calls = 0
    for file in sorted(root.rglob("*.py")):
        if file.name == "testing.py":  # builds local test models only
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("from_pretrained", "from_config", "snapshot_download_code"):
                calls += 1
                kw = {k.arg: k.value for k in node.keywords}
                where = f"{file.relative_to(root)}:{node.lineno}"
                assert "trust_remote_code" in kw, f"{where}: pass trust_remote_code from the option"
                value = kw["trust_remote_code"]
                assert not (isinstance(value, ast.Constant) and value.value is True), where
    from mergeflow.cli import build_parser

    args = build_parser().parse_args(["run", "c.yml", "out"])
    assert args.trust_remote_code is False
    assert args.dashboard_address.startswith("127.0.0.1:")


def test_tensor_names_never_become_paths(zoo, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    model = copy_model(zoo["a"], tmp_path / "models" / "odd")
    state = load_file(weights(model))
    odd = {"../../escape.weight": torch.ones(2), "/etc/passwd.weight": torch.ones(2)}
    save_file({**state, **odd}, weights(model), metadata={"format": "pt"})
    cfg = tmp_path / "merge.yml"
    cfg.write_text(f"merge_method: passthrough\nmodels: [{{model: {model}}}]\n")
    before = sorted(p for p in tmp_path.rglob("*") if "out" not in p.parts)
    assert main(["run", str(cfg), str(tmp_path / "out"), "--scheduler", "sync", "--quiet"]) == 0
    assert sorted(p for p in tmp_path.rglob("*") if "out" not in p.parts) == before
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(out[k], v) for k, v in odd.items())


@pytest.mark.parametrize("name", ["../tokenizer.json", "a/b.json", "/etc/passwd", "..", "", "x\\..\\y"])
def test_output_path_takes_plain_names_only(tmp_path, name):
    from mergeflow.errors import MergeflowError
    from mergeflow.output.metadata import output_path

    assert output_path(tmp_path, "tokenizer.json") == tmp_path / "tokenizer.json"
    with pytest.raises(MergeflowError, match="not a plain file name"):
        output_path(tmp_path, name)


def test_default_cluster_listens_on_loopback_only(zoo, tmp_path, monkeypatch, capsys):
    """The default scheduler's dashboard and workers bind 127.0.0.1, and the link says so."""
    import psutil

    from mergeflow.exec import tasks

    seen = tmp_path / "listening"  # the task runs on a copy of this function (cloudpickle)
    real = tasks.finalize

    def look(*args):
        ips = {c.laddr.ip for c in psutil.Process().net_connections(kind="inet")
               if c.status == psutil.CONN_LISTEN}
        seen.write_text(" ".join(sorted(ips)))
        return real(*args)
    monkeypatch.setattr(tasks, "finalize", look)
    env = Env(zoo, tmp_path, monkeypatch)
    assert main(["run", env.linear("{a}", "{b}"), str(env.out)]) == 0
    assert seen.read_text() == "127.0.0.1"
    assert "dashboard: http://127.0.0.1:" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--memory-limit", "lots"], ["--out-shard-size", "big"]])
def test_bad_sizes_are_refused_before_anything_runs(tmp_path, capsys, option):
    with pytest.raises(SystemExit) as stop:
        main(["run", "merge.yml", str(tmp_path / "out"), *option])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option[0]}: not a size: '{option[1]}'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
