"""Every example config in configs/ runs on the shipped example models (examples/models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergeflow.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yml"))


def test_there_is_an_example_per_method():
    from mergeflow.methods import REGISTRY

    assert {p.stem for p in CONFIGS} >= set(REGISTRY)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_example_runs(config, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # example model paths are relative to the repository root
    out = tmp_path / "out"
    assert main(["run", str(config), str(out), "--scheduler", "sync", "--quiet"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (out / "model.safetensors").stat().st_size > 100_000
