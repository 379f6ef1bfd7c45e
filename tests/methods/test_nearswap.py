"""nearswap: golden values, identity cases, declaration."""

from __future__ import annotations

import torch

from mergeflow.methods import REGISTRY
from mergeflow.methods.nearswap import nearswap

B = torch.zeros(3)
X = torch.tensor([0.1, 1.0, -2.0])


def test_golden():
    # w = clamp(0.5/|b-x|, 0, 1) = [clamp(5) = 1, 0.5, 0.25]; r = w x + (1-w) b
    assert torch.equal(nearswap([X], B, t=0.5), torch.tensor([0.1, 0.5, -0.5]))


def test_t_zero_keeps_base():
    b = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(nearswap([X], b, t=0.0), b)


def test_identical_inputs_give_input_back():
    # |b - x| = 0 -> clamp to 1e-6 -> w = 1
    x = torch.tensor([1.0, -2.0])
    assert torch.equal(nearswap([x.clone()], x, t=0.01), x)


def test_declaration():
    m = REGISTRY["nearswap"]
    assert (m.base, m.min_inputs, m.max_inputs) == ("required", 1, 1)
    assert m.param("t").required and m.param("t").check(-1) is not None
