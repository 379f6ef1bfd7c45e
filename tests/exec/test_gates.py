"""Router weights: seeded random draws with mergekit-moe's distributions, prompt vectors, the
warning about nearly dependent gates."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from mergeflow.exec.gates import degenerate_layers, degenerate_warning, gate_vectors, random_gate
from mergeflow.plan.moe import GatePlan

EX = Path(__file__).resolve().parents[2] / "examples" / "models"


def test_random_routers_depend_on_seed_and_name_alone():
    a = random_gate("random", 7, "model.layers.0.mlp.gate.weight", (8, 64))
    assert torch.equal(a, random_gate("random", 7, "model.layers.0.mlp.gate.weight", (8, 64)))
    assert not torch.equal(a, random_gate("random", 8, "model.layers.0.mlp.gate.weight", (8, 64)))
    assert not torch.equal(a, random_gate("random", 7, "model.layers.1.mlp.gate.weight", (8, 64)))
    assert a.dtype == torch.float32


def test_random_modes_have_mergekits_distributions():
    normal = random_gate("random", 0, "g", (64, 4096))  # torch.randn: N(0, 1)
    assert abs(normal.mean()) < 0.01 and abs(normal.std() - 1) < 0.01
    uniform = random_gate("uniform_random", 0, "g", (64, 4096))  # nn.Linear's init: U(-b, b), b = 1/sqrt(in)
    bound = 1 / math.sqrt(4096)
    assert uniform.abs().max() <= bound and uniform.abs().max() > 0.999 * bound
    assert abs(uniform.var() / (bound**2 / 3) - 1) < 0.01


def test_hidden_avg_averages_every_position_of_the_prompt():
    """mergekit's `hidden_avg`: the mean over the sequence (a single prompt: no padding), then
    over the prompts; computed here from the bfloat16 model's hidden states."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plan = GatePlan("hidden_avg", str(EX / "base"), ((("a b c d",), ()), (("x + y = z",), ())), 4, 64)
    got = gate_vectors(plan)
    model = AutoModelForCausalLM.from_pretrained(EX / "base", dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(EX / "base")
    for e, prompt in enumerate(("a b c d", "x + y = z")):
        ids = tok(["<s>" + prompt], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            states = torch.stack(model(**ids, output_hidden_states=True).hidden_states[:-1])[:, 0]
        mean = states.sum(dim=1) / states.shape[1]
        assert torch.equal(got[:, e], mean / mean.norm(dim=-1, keepdim=True))
    assert got.shape == (4, 2, 64) and got.dtype == torch.bfloat16


def test_nearly_dependent_gates_are_named():
    v = torch.eye(4, 16).repeat(3, 1, 1)
    v[1, 1] = v[1, 0] + 1e-3  # layer 1: two experts' vectors almost the same
    assert degenerate_layers(v) == [1]
    assert degenerate_warning([1], 3) == ("layer 1 of the router has nearly dependent gate vectors: the "
                                          "prompts may be too similar, and some experts will be rarely used")
    assert degenerate_warning([0, 2], 3).startswith("layers 0, 2 of the router have")
    assert degenerate_warning([0, 1, 2], 3).startswith("every layer of the router has nearly")
    assert degenerate_warning([], 3) is None


def test_gate_vectors_travel_to_process_workers(monkeypatch):
    """The gate task's result reaches the router writes on other processes through
    distributed's serializer, which refuses bfloat16 tensors (a hidden-mode run hung)."""
    from distributed.protocol import deserialize, serialize

    from mergeflow.exec import moe

    hidden = torch.randn(4, 2, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    monkeypatch.setattr(moe.gates, "gate_vectors", lambda plan: hidden)
    vectors = moe.compute_gates(GatePlan("hidden", str(EX / "base"), (), 4, 64))
    assert torch.equal(deserialize(*serialize(vectors)), vectors)
    assert torch.equal(vectors.to(torch.bfloat16), hidden)  # the hidden states' values, exactly
