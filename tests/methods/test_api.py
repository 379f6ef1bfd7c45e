"""merge_tensors / merge_state_dicts: the numbers of a config run, for tensors in memory."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import mergeflow
from mergeflow.cli import main
from mergeflow.errors import MergeflowError

CONFIGS = {
    "linear": ("merge_method: linear\nbase_model: {base}\nmodels:\n  - {{model: {base}, parameters: {{weight: 0.2}}}}\n"
               "  - {{model: {a}, parameters: {{weight: 0.5}}}}\n  - {{model: {b}, parameters: {{weight: 0.3}}}}\n",
               {"weight": [0.2, 0.5, 0.3]}, None),
    "ties": ("merge_method: ties\nbase_model: {base}\nmodels:\n  - {{model: {a}, parameters: {{weight: 0.6, density: 0.5}}}}\n"
             "  - {{model: {b}, parameters: {{weight: 0.4, density: 0.3}}}}\n",
             {"weight": {"a": 0.6, "b": 0.4}, "density": {"a": 0.5, "b": 0.3}}, "base"),
    "dare_ties": ("merge_method: dare_ties\nbase_model: {base}\nmodels:\n"
                  "  - {{model: {a}, parameters: {{weight: 0.6, density: 0.5}}}}\n"
                  "  - {{model: {b}, parameters: {{weight: 0.4, density: 0.5}}}}\n",
                  {"weight": {"a": 0.6, "b": 0.4}, "density": 0.5}, "base"),
    "slerp": ("merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {a}\nparameters: {{t: 0.3}}\n",
              {"t": 0.3}, "base"),
}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_state_dicts_merge_to_the_bytes_of_a_config_run(family, tmp_path, method):
    text, params, base = CONFIGS[method]
    cfg = tmp_path / "m.yml"
    cfg.write_text(text.format(**family) + "dtype: bfloat16\n")
    args = ["run", str(cfg), str(tmp_path / "out"), "--scheduler", "sync", "--quiet", "--random-seed", "7"]
    assert main(args) == 0
    expected = load_file(tmp_path / "out" / "model.safetensors")
    models = {k: load_file(family[k] / "model.safetensors") for k in ("base", "a", "b")}
    if method == "slerp":
        models.pop("b")
    if method == "linear":  # the base is one more weighted input, listed first
        models = {0: models["base"], 1: models["a"], 2: models["b"]}
    got = mergeflow.merge_state_dicts(models, method, parameters=params, base=base, dtype=torch.bfloat16, seed=7)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_merge_tensors_golden_and_errors():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    # linear, normalized: (0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 6) = (2.5, 5.0)
    out = mergeflow.merge_tensors([a, b], "linear", parameters={"weight": [0.25, 0.75]})
    assert out.tolist() == [2.5, 5.0]
    # task_arithmetic with b as the base: b + 2 * (a - b) = (-1, -2)
    out = mergeflow.merge_tensors([a, b], "task_arithmetic", parameters={"weight": 2.0}, base_index=1)
    assert out.tolist() == [-1.0, -2.0]
    with pytest.raises(MergeflowError, match="'densty' is not a parameter of ties"):
        mergeflow.merge_tensors([a, b], "ties", parameters={"weight": 1.0, "densty": 0.5}, base_index=0)
    with pytest.raises(MergeflowError, match="ties needs 'weight'"):
        mergeflow.merge_tensors([a, b], "ties", base_index=0)
    with pytest.raises(MergeflowError, match="density must be <= 1"):
        mergeflow.merge_tensors([a, b], "ties", parameters={"weight": 1.0, "density": 1.5}, base_index=0)
    with pytest.raises(MergeflowError, match="needs a base model"):
        mergeflow.merge_tensors([a, b], "ties", parameters={"weight": 1.0})
    with pytest.raises(MergeflowError, match="did you mean 'slerp'"):
        mergeflow.merge_tensors([a, b], "slrep")
    with pytest.raises(MergeflowError, match="shapes differ"):
        mergeflow.merge_tensors([a, torch.zeros(3)], "linear", parameters={"weight": 1.0})


def test_state_dict_buffers_are_copied_when_equal_and_refused_otherwise():
    sd = [{"w": torch.ones(2), "pos": torch.arange(3)}, {"w": torch.zeros(2), "pos": torch.arange(3)}]
    got = mergeflow.merge_state_dicts(sd, "linear", parameters={"weight": 1.0})
    assert got["w"].tolist() == [0.5, 0.5] and torch.equal(got["pos"], torch.arange(3))
    sd[1]["pos"] = torch.arange(1, 4)
    with pytest.raises(MergeflowError, match="pos is not a float tensor and the models hold different values"):
        mergeflow.merge_state_dicts(sd, "linear", parameters={"weight": 1.0})
    with pytest.raises(MergeflowError, match="tensor names differ"):
        mergeflow.merge_state_dicts([{"w": torch.ones(2)}, {"v": torch.ones(2)}], "linear", parameters={"weight": 1.0})
