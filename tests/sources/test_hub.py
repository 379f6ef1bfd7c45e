"""Models by Hub id from a Hugging Face cache laid out as huggingface_hub lays it out.

The cache is built on disk (hubcache.py): blobs, snapshot symlinks into ../../blobs, refs.
Everything runs with HF_HUB_OFFLINE=1 and HF_HUB_CACHE pointing at it: nothing is fetched.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hubcache import cache_model
from safetensors.torch import load_file, save_file

from mergeflow.cli import main
from mergeflow.errors import MergeflowError
from mergeflow.plan import plan_merge
from mergeflow.sources.hub import download_command, resolve_model_path
from mergeflow.spec.config import ModelRef, parse_config
from mergeflow.testing import make_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LORA_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def hub(family, tmp_path_factory) -> dict[str, Path]:
    """A cache holding acme/sharded (two shards, refs main) and acme/lora (refs main, v1)."""
    root = tmp_path_factory.mktemp("hub")
    sharded = make_model(root / "local" / "sharded", seed=7, base=family["base"], shards=2)
    adapter = root / "local" / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": torch.full((2, 64), 0.5),
               f"{prefix}.lora_B.weight": torch.full((64, 2), 0.25)}, adapter / "adapter_model.safetensors")
    cache = root / "cache"
    cache_model(cache, "acme/sharded", sharded, COMMIT)
    cache_model(cache, "acme/lora", adapter, LORA_COMMIT, refs=("main", "v1"))
    return {"cache": cache, "sharded": sharded, "lora": adapter}


@pytest.fixture
def offline(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


def test_the_cache_is_what_huggingface_hub_reads(hub):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    repos = {r.repo_id: r for r in scan_cache_dir(hub["cache"]).repos}
    (rev,) = repos["acme/sharded"].revisions
    assert rev.commit_hash == COMMIT and rev.refs == frozenset({"main"})
    shard = next(f for f in rev.files if f.file_name == "model-00001-of-00002.safetensors")
    assert shard.file_path.is_symlink() and shard.blob_path.parent.name == "blobs"
    found = try_to_load_from_cache("acme/sharded", "config.json", cache_dir=hub["cache"])
    assert Path(found) == hub["cache"] / "models--acme--sharded" / "snapshots" / COMMIT / "config.json"


@pytest.mark.parametrize("revision", [None, "main", COMMIT])
def test_a_hub_id_resolves_to_its_snapshot(offline, revision):
    path = resolve_model_path(ModelRef("acme/sharded", revision), allow_download=False)
    assert path == offline["cache"] / "models--acme--sharded" / "snapshots" / COMMIT


def test_a_sharded_model_merges_by_hub_id_offline(family, offline, tmp_path):
    """The index of a cached sharded model names shards that are links into blobs/: read
    through the links, merged to the same bytes as from the local directory."""
    outs = {}
    for name, ref in (("hub", "acme/sharded@main"), ("local", offline["sharded"])):
        cfg = tmp_path / f"{name}.yml"
        cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {ref}\n    parameters: {{weight: 0.5}}\n"
                       f"  - model: {family['a']}\n    parameters: {{weight: 0.5}}\n")
        assert main(["run", str(cfg), str(tmp_path / name), "--scheduler", "sync", "--quiet"]) == 0
        outs[name] = (tmp_path / name / "model.safetensors").read_bytes()
    assert outs["hub"] == outs["local"]
    merged = load_file(tmp_path / "hub" / "model.safetensors")
    assert merged.keys() == load_file(family["a"] / "model.safetensors").keys() and len(merged) == 39


def test_lora_adapter_from_the_cache_at_a_revision(family, offline, tmp_path):
    """`model+org/adapter@rev`: the revision is the adapter's (mergekit's parse); the adapter
    comes from the cache like a model."""
    outs = {}
    for name, lora in (("hub", "acme/lora@v1"), ("commit", f"acme/lora@{LORA_COMMIT}"), ("local", offline["lora"])):
        cfg = tmp_path / f"{name}.yml"
        cfg.write_text(f"merge_method: passthrough\nmodels: [{{model: {family['a']}+{lora}}}]\n")
        assert main(["run", str(cfg), str(tmp_path / name), "--scheduler", "sync", "--quiet"]) == 0
        outs[name] = load_file(tmp_path / name / "model.safetensors")
    w = load_file(family["a"] / "model.safetensors")[Q]
    # scale = alpha / r = 2; B @ A = 2 * 0.25 * 0.5 = 0.25 everywhere -> W + 0.5, rounded once
    assert torch.equal(outs["hub"][Q], (w.float() + 0.5).to(w.dtype))
    assert all(torch.equal(outs[k][Q], outs["local"][Q]) for k in ("hub", "commit"))


def test_an_uncached_revision_names_the_download_command_and_what_is_cached(offline):
    with pytest.raises(MergeflowError) as e:
        resolve_model_path(ModelRef("acme/sharded", "v2"))
    msg = str(e.value)
    assert msg.startswith("model acme/sharded@v2: not a local directory and not in the Hugging Face cache")
    assert f"the cache has it at {COMMIT} (main)" in msg
    assert "download it first with `hf download acme/sharded --revision v2`" in msg
    with pytest.raises(MergeflowError, match=r"`hf download acme/missing` or give a local path"):
        resolve_model_path(ModelRef("acme/missing"))


def test_an_uncached_adapter_is_named_as_the_adapter(family, offline):
    text = f"merge_method: passthrough\nmodels: [{{model: {family['a']}+acme/other-lora@dev}}]\n"
    with pytest.raises(MergeflowError, match=r"adapter acme/other-lora@dev: not a local directory.*"
                                             r"`hf download acme/other-lora --revision dev`"):
        plan_merge(parse_config(text), allow_download=False)


def test_the_download_command_is_the_installed_clis(monkeypatch):
    from importlib import metadata

    scripts = {e.name for e in metadata.distribution("huggingface_hub").entry_points
               if e.group == "console_scripts"}
    assert "hf" in scripts  # huggingface_hub >= 0.34 installs `hf` (and this one no huggingface-cli)
    assert download_command("org/name", "main") == "hf download org/name --revision main"

    class Old:
        entry_points = [metadata.EntryPoint("huggingface-cli", "x:y", "console_scripts")]
    monkeypatch.setattr(metadata, "distribution", lambda name: Old)
    assert download_command("org/name", None) == "huggingface-cli download org/name"


def test_a_missing_blob_is_a_missing_shard(family, offline, tmp_path):
    """A snapshot whose shard link dangles (an interrupted download) names the shard."""
    cache = tmp_path / "cache"
    snap = cache_model(cache, "acme/broken", offline["sharded"], COMMIT)
    (snap / "model-00002-of-00002.safetensors").resolve().unlink()
    with pytest.MonkeyPatch.context() as m:
        m.setenv("HF_HUB_CACHE", str(cache))
        text = "merge_method: passthrough\nmodels: [{model: acme/broken}]\n"
        with pytest.raises(MergeflowError, match=r"lists model-00002-of-00002.safetensors, which is missing"):
            plan_merge(parse_config(text), allow_download=False)
