"""Shared fixtures: a tiny model family built once per test session, and a config writer."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergeflow.testing import make_family, make_vlm_family


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> dict[str, Path]:
    """A llama-style base (4 layers, hidden 64, bf16) and fine-tunes `a` and `b` of it."""
    return make_family(tmp_path_factory.mktemp("family"), finetunes=["a", "b"], seed=0)


@pytest.fixture(scope="session")
def vlm_family(tmp_path_factory) -> dict[str, Path]:
    """A tiny vision-language model (transformers' Mistral3: text decoder, vision tower,
    projector; 2 + 2 layers, bf16) at `base` and fine-tunes `a` and `b` of it."""
    return make_vlm_family(tmp_path_factory.mktemp("vlm"), finetunes=("a", "b"), seed=0)


@pytest.fixture
def config(family, tmp_path) -> Path:
    """A dare_ties merge of the family (random, so it also checks seeding across schedulers)."""
    path = tmp_path / "dare.yml"
    path.write_text(f"""merge_method: dare_ties
base_model: {family['base']}
models:
  - model: {family['a']}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {family['b']}
    parameters: {{weight: 0.4, density: 0.5}}
dtype: bfloat16
""")
    return path


@pytest.fixture
def write_config(tmp_path):
    """Write YAML text to a file in tmp_path and return its path."""

    def write(text: str, name: str = "merge.yml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write
