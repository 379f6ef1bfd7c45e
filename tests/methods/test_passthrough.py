"""passthrough: one input, optional scale."""

from __future__ import annotations

import torch

from mergeflow.methods import REGISTRY
from mergeflow.methods.passthrough import passthrough

X = torch.tensor([1.0, -2.0, 3.0])


def test_no_scale_returns_input():
    assert passthrough([X], None, scale=[None]) is X


def test_scale_multiplies():
    # [1, -2, 3] * 0.5
    assert torch.equal(passthrough([X], None, scale=[0.5]), torch.tensor([0.5, -1.0, 1.5]))


def test_scale_in_compute_dtype():
    x = torch.ones(1, dtype=torch.bfloat16)
    assert passthrough([x], None, scale=[0.3]).item() == 0.30078125


def test_declaration():
    m = REGISTRY["passthrough"]
    assert (m.base, m.min_inputs, m.max_inputs) == ("input", 1, 1)
    assert m.param("scale").per_model and m.param("scale").default is None
