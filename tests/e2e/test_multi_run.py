"""`mergeflow multi`: a chain of stages as one graph writes what running each stage with
`mergeflow run` on the previous stage's output writes, and nothing of the stages between."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mergeflow.cli import main
from mergeflow.exec import budget
from mergeflow.plan.multi import plan_multi, stage_files
from mergeflow.spec.multi import load_multi
from mergeflow.testing import CHAT_TOKENS, TokenizerSpec, make_model

CHAIN = """name: s1
merge_method: ties
base_model: {base}
models:
  - model: {base}
  - {{model: {a}, parameters: {{weight: 0.6, density: 0.5}}}}
  - {{model: {b}, parameters: {{weight: 0.4, density: 0.4}}}}
dtype: bfloat16
---
name: s2
merge_method: slerp
base_model: s1
models:
  - model: s1
  - model: {c}
parameters:
  t: [0.2, 0.7]
---
# a frankenmerge of s2: 6 layers, s2's layers 1 and 2 twice
merge_method: passthrough
slices:
  - sources: [{{model: s2, layer_range: [0, 3]}}]
  - sources: [{{model: s2, layer_range: [1, 4]}}]
"""
STAGES = ("s1", "s2", None)
META = {"README.md", "mergekit_config.yml"}  # these name how the model was made, so they differ


@pytest.fixture(scope="module")
def models(family, tmp_path_factory) -> dict[str, Path]:
    """The family (base, a, b) and a third model c for the second stage."""
    c = make_model(tmp_path_factory.mktemp("third") / "c", seed=7, base=family["base"])
    return {**family, "c": c}


def split(text: str, outputs: dict[str, Path]) -> list[str]:
    """Each document as a config of its own, stage names replaced by their output directories."""
    docs = []
    for doc in text.split("---\n"):
        for name, out in outputs.items():
            doc = doc.replace(f"name: {name}\n", "").replace(f"model: {name}", f"model: {out}")
        docs.append(doc)
    return docs


def stage_by_stage(text: str, root: Path, *extra: str) -> list[Path]:
    """Run every stage with `mergeflow run` on the previous stages' output directories."""
    root.mkdir()
    outputs = {name: root / name for name in STAGES if name}
    dirs = []
    for k, doc in enumerate(split(text, outputs)):
        config = root / f"stage{k}.yml"
        config.write_text(doc)
        out = outputs.get(STAGES[k], root / "final")
        assert main(["run", str(config), str(out), "--quiet", "--scheduler", "sync", *extra]) == 0
        dirs.append(out)
    return dirs


def files(directory: Path, skip: set[str] = META) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file() and p.name not in skip}


@pytest.fixture(scope="module")
def chain(models, tmp_path_factory) -> tuple[Path, list[Path]]:
    """The chain's config file and the three directories `mergeflow run` writes stage by stage."""
    root = tmp_path_factory.mktemp("chain")
    config = root / "chain.yml"
    config.write_text(CHAIN.format(**models))
    return config, stage_by_stage(CHAIN.format(**models), root / "runs")


def multi(config: Path, out: Path, *extra: str) -> int:
    return main(["multi", str(config), str(out), "--quiet", "--dashboard-address", "127.0.0.1:0", *extra])


def stage_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("mergeflow-stages-*")}


@pytest.mark.parametrize("scheduler", ["sync", "distributed"])
def test_the_chain_writes_what_its_stages_write_one_by_one(chain, tmp_path, scheduler):
    config, runs = chain
    before = stage_dirs()
    assert multi(config, tmp_path / "out", "--scheduler", scheduler) == 0
    out = tmp_path / "out"
    assert files(out) == files(runs[-1])
    assert sorted(files(out)) == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                                  "tokenizer_config.json"]
    # nothing of s1 or s2 was written: no other file or directory, here or in the temporary directory
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == sorted(
        ["out"] + [f"out/{n}" for n in files(out, set())])
    assert stage_dirs() == before
    assert (out / "mergekit_config.yml").read_text() == config.read_text()
    card = (out / "README.md").read_text()
    for doc in config.read_text().split("---\n"):
        assert f"```yaml\n{doc.strip()}\n```" in card
    assert "### Stage `s1`: ties (computed in the same graph, never written)" in card
    assert "### The output: passthrough (the output)" in card


def test_with_intermediate_dir_the_stages_are_written_as_their_own_runs(chain, tmp_path):
    config, runs = chain
    inter = tmp_path / "inter"
    assert multi(config, tmp_path / "out", "-I", str(inter), "--scheduler", "distributed") == 0
    assert files(tmp_path / "out") == files(runs[-1])
    assert sorted(p.name for p in inter.iterdir()) == ["s1", "s2"]
    docs = config.read_text().split("---\n")
    for name, run, doc in zip(("s1", "s2"), runs, docs):
        assert files(inter / name) == files(run)
        assert (inter / name / "mergekit_config.yml").read_text() == doc  # its own document, `name:` included
        assert not (inter / name / ".mergeflow").exists()
    # what a later stage's planner saw of s1 is what s1's directory holds
    with tempfile.TemporaryDirectory() as work:
        plan = plan_multi(load_multi(config), work, out_dir=tmp_path / "again").stage("s1").plan
        assert stage_files(plan) == {n: d for n, d in files(inter / "s1").items() if n != "model.safetensors"}


def test_lazy_reads_finished_intermediates_and_no_lazy_merges_them_again(chain, tmp_path, capsys):
    config, runs = chain
    inter = tmp_path / "inter"
    assert multi(config, tmp_path / "out", "-I", str(inter), "--scheduler", "sync") == 0
    stamp = (inter / "s2" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert multi(config, tmp_path / "out", "-I", str(inter), "--scheduler", "sync", "--force") == 0
    err = capsys.readouterr().err
    assert f"stage s2: complete in {inter.resolve() / 's2'}, read as it is (--no-lazy merges it again)" in err
    assert "stage s1" not in err  # only s2 is read: s1 is not needed
    assert (inter / "s2" / "model.safetensors").stat().st_mtime_ns == stamp
    assert files(tmp_path / "out") == files(runs[-1])
    assert multi(config, tmp_path / "out", "-I", str(inter), "--scheduler", "sync", "--no-lazy") == 2
    assert "is not empty; --force overwrites it" in capsys.readouterr().err
    assert multi(config, tmp_path / "out", "-I", str(inter), "--scheduler", "sync", "--no-lazy", "--force") == 0
    assert (inter / "s2" / "model.safetensors").stat().st_mtime_ns != stamp
    assert files(inter / "s2") == files(runs[1])


@pytest.mark.parametrize("change, message", [
    (("model: s2, layer_range: [0, 3]", "model: s22, layer_range: [0, 3]"),
     ":22:16: `s22` is neither a stage of this file (its stages: `s1`, `s2`) nor a model directory; did you "
     "mean `s2`?"),
    (("model: {a}", "model: s2"),
     ":14:5: stage `s1` is read by a stage it reads itself (`s1` -> `s2` -> `s1`): a cycle"),
])
def test_a_cycle_or_an_unknown_name_is_exit_2_before_anything_is_written(models, tmp_path, capsys, change,
                                                                         message):
    config = tmp_path / "chain.yml"
    config.write_text(CHAIN.replace(*change).format(**models))
    assert multi(config, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {config}: 1 problem(s) with the stages (no model was read):\n  - {config}:")
    assert message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chain.yml"]


def test_a_stage_that_does_not_plan_is_exit_2_naming_its_document(models, tmp_path, capsys):
    config = tmp_path / "chain.yml"
    config.write_text(CHAIN.replace("layer_range: [1, 4]", "layer_range: [1, 5]").format(**models))
    assert multi(config, tmp_path / "out", "-I", str(tmp_path / "inter")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the unnamed output (document 3, {config}:20): {config}: 1 problem(s) found "
                          "while planning the merge (no tensor was read):")
    assert "layer_range [1, 5] goes beyond s2, which has 4 layers (0..3)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chain.yml"]


def test_plan_shows_the_stages_what_flows_and_the_bytes_not_written(chain, capsys):
    config, runs = chain
    assert main(["plan", str(config)]) == 0
    out = capsys.readouterr().out.splitlines()
    size = [(run / "model.safetensors").stat().st_size for run in runs]
    assert out[0] == f"config:         {config} (3 stages: s1 -> s2 -> output)"
    assert out[1].startswith("stage s1:       ties of ") and out[1].endswith("; computed in the graph, never written")
    assert out[3].startswith("output:         passthrough of s2 -> 57 tensors, ") and out[3].endswith("written to OUT")
    assert out[4].startswith("flow:           s1 -> s2: 39 tensors") and out[4].endswith("read 39 times")
    assert out[5].startswith("flow:           s2 -> output: 39 tensors") and out[5].endswith("read 57 times")
    from mergeflow.spec.sizes import human_bytes

    assert out[7] == (f"bytes written:  {human_bytes(size[2])} (stage by stage: {human_bytes(sum(size))}; "
                      f"not written: {human_bytes(size[0] + size[1])})")
    assert main(["validate", str(config)]) == 0
    assert capsys.readouterr().out == f"{config}: ok (3 stages: s1 (ties), s2 (slerp), output (passthrough))\n"


def test_run_refuses_a_multi_stage_file_with_the_command_to_use(chain, tmp_path, capsys):
    assert main(["run", str(chain[0]), str(tmp_path / "out")]) == 2
    assert "run it with `mergeflow multi`" in capsys.readouterr().err


# ----------------------------------------------------------------------------- vocabularies

VOCAB = """name: s1
merge_method: linear
models:
  - {{model: {base}, parameters: {{weight: 0.5}}}}
  - {{model: {ext}, parameters: {{weight: 0.5}}}}
tokenizer_source: union
dtype: float32
---
name: s2
merge_method: ties
base_model: {base}
models:
  - {{model: s1, parameters: {{weight: 0.7, density: 0.5}}}}
  - {{model: {chat}, parameters: {{weight: 0.3, density: 0.5}}}}
tokenizer_source: union
dtype: float32
---
merge_method: linear
models:
  - {{model: s2, parameters: {{weight: 0.6}}}}
  - {{model: {a}, parameters: {{weight: 0.4}}}}
tokenizer_source: base
dtype: bfloat16
"""


@pytest.fixture(scope="module")
def vocab_chain(family, tmp_path_factory) -> tuple[Path, list[Path]]:
    """Three stages whose vocabularies differ: s1 adds ext's 16 BPE tokens, s2 chat's 2 added
    tokens, so s2 and the output gather their inputs' embedding rows by token."""
    root = tmp_path_factory.mktemp("vocab")
    zoo = {**family, "ext": make_model(root / "ext", seed=4, base=family["base"], tokenizer=TokenizerSpec(vocab_size=400)),
           "chat": make_model(root / "chat", seed=5, base=family["base"],
                              tokenizer=TokenizerSpec(added_tokens=CHAT_TOKENS))}
    config = root / "vocab.yml"
    config.write_text(VOCAB.format(**zoo))
    return config, stage_by_stage(VOCAB.format(**zoo), root / "runs")


def test_rows_gathered_by_token_held_whole_or_spilled_give_the_same_bytes(vocab_chain, tmp_path, capsys,
                                                                           monkeypatch):
    config, runs = vocab_chain
    assert main(["plan", str(config)]) == 0
    plan = capsys.readouterr().out
    assert ("held whole:     2 tensor(s) gather intermediate rows by token and hold them: model.embed_tokens.weight "
            "holds s2:model.embed_tokens.weight; lm_head.weight holds s2:lm_head.weight") in plan
    assert "spilled:        2 intermediate tensor(s) written to OUT/.mergeflow/spill" in plan  # read by s2's
    assert "s1:model.embed_tokens.weight (102.40 KB), s1:lm_head.weight (102.40 KB)" in plan
    assert multi(config, tmp_path / "held", "--scheduler", "sync") == 0
    assert files(tmp_path / "held") == files(runs[-1])
    monkeypatch.setattr(budget, "RESIDENT_WITHOUT_LIMIT", 0)  # nothing fits: every gathered tensor spills
    assert main(["plan", str(config)]) == 0
    assert "spilled:        4 intermediate tensor(s)" in capsys.readouterr().out
    assert multi(config, tmp_path / "spilled", "--scheduler", "distributed") == 0
    assert files(tmp_path / "spilled") == files(runs[-1])
    assert not (tmp_path / "spilled" / ".mergeflow").exists()


# ----------------------------------------------------------------------------- resume


def test_an_interrupted_chain_resumes_to_the_same_bytes(chain, tmp_path):
    config, runs = chain
    out, stopped = tmp_path / "out", tmp_path / "stopped"
    env = {**os.environ, "MF_STOP_AFTER": "20", "MF_STOPPED": str(stopped)}
    cmd = [sys.executable, str(Path(__file__).with_name("_stop_after.py")), "multi", str(config), str(out),
           "--quiet", "--scheduler", "sync", "--out-shard-size", "100KB"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not stopped.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the merge never reached the stop"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert not (out / "config.json").exists()
    changed = tmp_path / "changed.yml"  # a change in the first stage changes the whole chain
    changed.write_text(config.read_text().replace("density: 0.4", "density: 0.3"))
    assert main(["multi", str(changed), str(out), "--quiet", "--scheduler", "sync", "--out-shard-size", "100KB",
                 "--resume"]) == 2
    assert main(["multi", str(config), str(out), "--quiet", "--scheduler", "sync", "--out-shard-size", "100KB",
                 "--resume"]) == 0
    reference = tmp_path / "reference"
    assert main(["multi", str(config), str(reference), "--quiet", "--scheduler", "sync", "--out-shard-size",
                 "100KB"]) == 0
    assert files(out, set()) == files(reference, set())
    assert "model.safetensors.index.json" in files(out)


def test_an_adapter_on_a_stage_written_with_intermediate_dir(family, tmp_path):
    import json

    import torch
    from safetensors.torch import save_file

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    prefix = "base_model.model.model.layers.1.mlp.up_proj"
    save_file({f"{prefix}.lora_A.weight": torch.full((2, 64), 0.5), f"{prefix}.lora_B.weight": torch.full((128, 2), 0.25)},
              adapter / "adapter_model.safetensors")
    text = (f"name: s1\nmerge_method: linear\nmodels:\n  - {{model: {family['a']}, parameters: {{weight: 0.5}}}}\n"
            f"  - {{model: {family['b']}, parameters: {{weight: 0.5}}}}\n---\n"
            f"merge_method: passthrough\nmodels: [{{model: s1+{adapter}}}]\n")
    config = tmp_path / "chain.yml"
    config.write_text(text)
    assert multi(config, tmp_path / "out", "-I", str(tmp_path / "inter"), "--scheduler", "sync") == 0
    runs = tmp_path / "runs"
    runs.mkdir()
    first, second = text.split("---\n")
    (runs / "s1.yml").write_text(first.replace("name: s1\n", ""))
    (runs / "out.yml").write_text(second.replace("model: s1+", f"model: {runs / 's1'}+"))
    for name in ("s1", "out"):
        assert main(["run", str(runs / f"{name}.yml"), str(runs / name), "--quiet", "--scheduler", "sync"]) == 0
    assert files(tmp_path / "out") == files(runs / "out")
    assert files(tmp_path / "out")["model.safetensors"] != files(runs / "s1")["model.safetensors"]
