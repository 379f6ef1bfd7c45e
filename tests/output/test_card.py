"""The model card and config a merge writes: Hub-valid front matter (checked offline with
huggingface_hub), the method and its paper, the models, the config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import validate_repo_id
from safetensors.torch import save_file

from mergeflow.cli import main
from mergeflow.output.card import METHODS, hub_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def cached(cache: Path, repo_id: str, source: Path) -> None:
    """Put a copy of `source` into the Hugging Face cache at `cache` as `repo_id`."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(source, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


def with_card(model: Path, front: str) -> None:
    (model / "README.md").write_text(f"---\n{front}---\n# a model\n")


@pytest.fixture
def hub(family, tmp_path, monkeypatch) -> dict[str, Path]:
    """acme/base and acme/tune-a (with cards: apache-2.0) and the LoRA adapter
    acme/adapter in a Hub cache; a local copy of fine-tune b (its card: apache-2.0)."""
    staged = tmp_path / "staged"
    for name in ("base", "a", "b"):
        shutil.copytree(family[name], staged / name)
        with_card(staged / name, "license: apache-2.0\n")
    adapter = staged / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    prefix = "base_model.model." + Q_PROJ.removesuffix(".weight")
    save_file({f"{prefix}.lora_A.weight": torch.zeros(2, 64), f"{prefix}.lora_B.weight": torch.zeros(64, 2)},
              adapter / "adapter_model.safetensors")
    cache = tmp_path / "hub"
    for repo_id, name in (("acme/base", "base"), ("acme/tune-a", "a"), ("acme/adapter", "adapter")):
        cached(cache, repo_id, staged / name)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return {"b": staged / "b"}


def merge(tmp_path: Path, local_b: Path) -> Path:
    config = tmp_path / "ties.yml"
    config.write_text(f"""merge_method: ties
base_model: acme/base
models:
  - model: acme/tune-a+acme/adapter
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {local_b}
    parameters: {{weight: 0.4, density: 0.5}}
dtype: bfloat16
""")
    out = tmp_path / "out"
    assert main(["run", str(config), str(out), "--scheduler", "sync", "--quiet"]) == 0
    assert (out / "mergekit_config.yml").read_text() == config.read_text()
    return out


def test_the_card_is_one_the_hub_accepts(hub, tmp_path):
    out = merge(tmp_path, hub["b"])
    text = (out / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front == {"base_model": ["acme/base", "acme/tune-a", "acme/adapter"],  # no local path
                     "base_model_relation": "merge", "license": "apache-2.0",
                     "library_name": "transformers", "tags": ["merge", "mergeflow"]}
    card = ModelCard(text)  # huggingface_hub's own parse of the card, as push_to_hub reads it
    assert card.data.to_dict() == front and card.data.base_model == front["base_model"]
    for repo_id in card.data.base_model:
        validate_repo_id(repo_id)  # raises for a path or anything that is not a Hub id
    assert ModelCardData(**front).to_dict() == front  # every key is one the card model knows
    body = card.text
    assert "using the [TIES](https://arxiv.org/abs/2306.01708) merge method (`merge_method: ties`), " \
           "with [acme/base](https://huggingface.co/acme/base) as the base." in body
    assert ("- [acme/tune-a](https://huggingface.co/acme/tune-a) with the LoRA adapter "
            "[acme/adapter](https://huggingface.co/acme/adapter)\n") in body
    assert f"- `{hub['b']}`\n" in body and "- [acme/base](https://huggingface.co/acme/base) (base)\n" in body
    assert "```yaml\nmerge_method: ties\nbase_model: acme/base\n" in body


def test_the_license_is_named_only_when_every_input_agrees(hub, tmp_path):
    with_card(hub["b"], "license: mit\n")
    front = yaml.safe_load((merge(tmp_path, hub["b"]) / "README.md").read_text().split("---\n")[1])
    assert "license" not in front and front["base_model_relation"] == "merge"


def test_local_models_only_give_no_base_model(family, tmp_path):
    config = tmp_path / "linear.yml"
    config.write_text(f"merge_method: linear\nmodels:\n  - model: {family['a']}\n    parameters: {{weight: 1}}\n"
                      f"  - model: {family['b']}\n    parameters: {{weight: 1}}\n")
    out = tmp_path / "out"
    assert main(["run", str(config), str(out), "--scheduler", "sync", "--quiet"]) == 0
    card = ModelCard((out / "README.md").read_text())
    assert card.data.to_dict() == {"library_name": "transformers", "tags": ["merge", "mergeflow"]}
    assert "[Linear (model soups)](https://arxiv.org/abs/2203.05482)" in card.text


def test_every_method_has_a_card_entry():
    from mergeflow.methods import REGISTRY

    assert set(METHODS) == set(REGISTRY)
    assert all(url.startswith("https://") for name, (_, url) in METHODS.items() if name != "passthrough")


def test_hub_ids_and_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local").mkdir(parents=True)
    assert hub_id("org/local") is None  # a directory here, as sources.models reads it
    assert hub_id("org/remote") == "org/remote"
    assert hub_id("/abs/path") is None and hub_id("./rel/x") is None and hub_id("a/b/c") is None
