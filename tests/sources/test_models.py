"""Reading input models: single weights files, directories without config.json, headers.

A model may be given as one `.safetensors` (or `.bin`) file or as a directory of weights
without config.json, as mergekit-pytorch takes them: its tensors merge by name with the
same bytes as from the full model directory. Headers are accepted exactly when the
safetensors library loads the file.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergeflow.cli import main
from mergeflow.errors import MergeflowError
from mergeflow.plan import plan_merge
from mergeflow.sources.models import read_model, read_safetensors_header
from mergeflow.spec.config import ModelRef, parse_config


def run(tmp_path: Path, name: str, text: str, *args: str) -> Path:
    cfg = tmp_path / f"{name}.yml"
    cfg.write_text(text)
    assert main(["run", str(cfg), str(tmp_path / name), "--scheduler", "sync", "--quiet", *args]) == 0
    return tmp_path / name


def linear(a, b) -> str:
    return (f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.3}}\n"
            f"  - model: {b}\n    parameters: {{weight: 0.7}}\n")


def test_a_single_safetensors_file_is_a_model(family, tmp_path):
    """mergekit-pytorch's input: files, merged by tensor name; the bytes of the directory merge,
    and a config.json that is empty (no input has one), with a warning saying so."""
    files = [family[n] / "model.safetensors" for n in ("a", "b")]
    plan = plan_merge(parse_config(linear(*files)))
    assert plan.out_config == {} and any("has no config.json" in w for w in plan.warnings)
    out = run(tmp_path, "files", linear(*files))
    ref = run(tmp_path, "dirs", linear(family["a"], family["b"]))
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    assert json.loads((out / "config.json").read_text()) == {}
    assert not (out / "tokenizer.json").exists()  # a file brings no tokenizer


def test_a_directory_without_config_json_merges_by_name(family, tmp_path):
    """Without config.json a model is bare tensors: no architecture to compare, layers from the
    names; the reference's config.json (here a's) is the output's."""
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(family["b"] / "model.safetensors", bare)
    assert read_model(ModelRef(str(bare))).config_file is None
    out = run(tmp_path, "bare-out", linear(family["a"], bare))
    ref = run(tmp_path, "ref", linear(family["a"], family["b"]))
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    assert (out / "config.json").read_bytes() == (ref / "config.json").read_bytes()


def test_a_single_bin_file_is_read_weights_only(family, tmp_path):
    state = load_file(family["b"] / "model.safetensors")
    torch.save(state, tmp_path / "b.bin")
    out = run(tmp_path, "bin", linear(family["a"], tmp_path / "b.bin"))
    ref = run(tmp_path, "ref", linear(family["a"], family["b"]))
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()


def test_a_file_of_another_kind_is_refused(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(MergeflowError, match=r"is a file; a model is a directory .* a single .safetensors file"):
        read_model(ModelRef(str(tmp_path / "weights.npz")))


def test_a_directory_with_model_safetensors_reads_only_that(family, tmp_path):
    """As transformers: a stray consolidated.safetensors beside model.safetensors is not read."""
    model = tmp_path / "m"
    shutil.copytree(family["a"], model)
    save_file({"other": torch.zeros(2)}, model / "consolidated.safetensors")
    assert "other" not in read_model(ModelRef(str(model))).tensors


def _write(path: Path, header: dict, data: bytes) -> Path:
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header, data", [
    ({"a": ENTRY}, b"\0" * 8),
    ({"a": ENTRY, "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [8, 8]}}, b"\0" * 8),
    ({}, b""),
    ({"a": ENTRY, "__metadata__": {"format": "pt"}}, b"\0" * 8),
    ({"a": {**ENTRY, "extra": 1}}, b"\0" * 8),
    ({"b": {"dtype": "BF16", "shape": [2], "data_offsets": [8, 12]}, "a": ENTRY}, b"\1" * 12),
    ({"a": ENTRY}, b"\0" * 9),  # appended
    ({"a": {**ENTRY, "data_offsets": [4, 12]}}, b"\0" * 12),  # gap at the start
    ({"a": ENTRY, "b": {**ENTRY, "data_offsets": [4, 12]}}, b"\0" * 12),  # overlap
    ({"a": {**ENTRY, "shape": [3]}}, b"\0" * 8),  # size disagrees
    ({"a": {**ENTRY, "data_offsets": [0, 16]}}, b"\0" * 8),  # past the end
    ({"a": ENTRY, "__metadata__": {"format": 1}}, b"\0" * 8),
    ({"a": {**ENTRY, "shape": [-2]}}, b"\0" * 8),
    ({"a": {**ENTRY, "data_offsets": [0.0, 8.0]}}, b"\0" * 8),
])
def test_a_header_is_accepted_exactly_when_safetensors_loads_the_file(tmp_path, header, data):
    path = _write(tmp_path / "t.safetensors", header, data)
    try:
        with safe_open(str(path), "pt") as f:
            expected = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception:  # noqa: BLE001
        expected = None
    try:
        got = {k: list(t.shape) for k, t in read_safetensors_header(path).items()}
    except MergeflowError:
        got = None
    assert got == expected
    if got:  # and each tensor's absolute byte range is where safetensors reads it
        tensors = read_safetensors_header(path)
        loaded = load_file(path)
        raw = path.read_bytes()
        for name, t in tensors.items():
            assert raw[t.begin:t.end] == loaded[name].contiguous().view(torch.uint8).numpy().tobytes()
