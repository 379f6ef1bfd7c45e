"""The mergekit-style corpus (configs/corpus/): every config runs (or is refused) as its
`# expect-...` lines say, printing exactly the warnings listed there, each at its line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mergeflow.cli import main

ROOT = Path(__file__).resolve().parents[2]
CORPUS = sorted((ROOT / "configs" / "corpus").glob("*.yml"))


def expectations(text: str) -> tuple[int, list[str], list[str]]:
    exit_code = int((re.findall(r"# expect-exit: (\d+)", text) or ["0"])[0])
    return exit_code, re.findall(r"# expect-warning: (.+)", text), re.findall(r"# expect-error: (.+)", text)


def test_the_corpus_covers_every_method_and_the_cases_of_issue_16():
    from mergeflow.methods import REGISTRY

    texts = "\n".join(p.read_text() for p in CORPUS)
    used = set(re.findall(r"^merge_method: (\w+)", texts, re.M))
    assert used == set(REGISTRY)
    for case in ("modules:", "VLM/", "1e-", "filter:", "[0, 0.3, 0.7, 1]", "expect-exit: 2", "lambda: 3.0"):
        assert case in texts, case


@pytest.mark.parametrize("config", CORPUS, ids=lambda p: p.stem)
def test_corpus_config(config, tmp_path, monkeypatch, capsys, vlm_family):
    monkeypatch.chdir(ROOT)  # the example models are named relative to the repository root
    text = config.read_text()
    path = tmp_path / config.name
    path.write_text(text.replace("VLM/", f"{vlm_family['base'].parent}/"))
    exit_code, warnings, errors = expectations(text)
    out = tmp_path / "out"
    assert main(["run", str(path), str(out), "--scheduler", "sync", "--quiet"]) == exit_code
    err = capsys.readouterr().err
    printed = [line.removeprefix("warning: ") for line in err.splitlines() if line.startswith("warning: ")]
    assert len(printed) == len(warnings), printed
    for expected in warnings:
        assert any(line.startswith(f"{path}:{expected}") for line in printed), (expected, printed)
    for expected in errors:
        assert f"{path}:{expected}" in err, err
    if exit_code == 0:
        assert (out / "config.json").exists()
    else:
        assert not out.exists()


def test_a_modules_merge_is_each_modules_own_models_and_loads_in_transformers(vlm_family, tmp_path):
    """modules: the text decoder taken from `a`, the vision tower from `b`, the projector
    from the base (weights 1 and 0, so each output tensor is one input's bytes); the output
    holds every tensor of the model and transformers loads it with no key missing or unused."""
    import torch
    from safetensors.torch import load_file
    from transformers import Mistral3ForConditionalGeneration

    def one(model: str, other: str) -> str:
        return (f"    models:\n      - {{model: {vlm_family[model]}, parameters: {{weight: 1.0}}}}\n"
                f"      - {{model: {vlm_family[other]}, parameters: {{weight: 0.0}}}}\n")
    text = ("merge_method: linear\nmodules:\n  text_decoder:\n" + one("a", "b") + "  vision_tower:\n"
            + one("b", "a") + "  multi_modal_projector:\n" + one("base", "a") + "dtype: bfloat16\n")
    config = tmp_path / "vlm.yml"
    config.write_text(text)
    out = tmp_path / "out"
    assert main(["run", str(config), str(out), "--scheduler", "sync", "--quiet"]) == 0
    merged = load_file(out / "model.safetensors")
    inputs = {m: load_file(vlm_family[m] / "model.safetensors") for m in ("base", "a", "b")}
    assert set(merged) == set(inputs["base"])
    for name, tensor in merged.items():
        source = "b" if "vision_tower" in name else "base" if "multi_modal_projector" in name else "a"
        assert torch.equal(tensor, inputs[source][name]), name
    assert not torch.equal(inputs["a"][next(n for n in merged if "vision_tower" in n)],
                           inputs["b"][next(n for n in merged if "vision_tower" in n)])
    model, info = Mistral3ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.config.text_config.num_hidden_layers == 2 and model.config.vision_config.num_hidden_layers == 2
