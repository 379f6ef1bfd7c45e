"""passthrough: one input, optional scale."""

from __future__ import annotations

import torch

from mergeflow.methods import REGISTRY
from mergeflow.methods.passthrough import passthrough

X = torch.tensor([1.0, -2.0, 3.0])


def test_no_scale_returns_input():
    out = passthrough([X], None, scale=[None])
    assert torch.equal(out, X) and out.data_ptr() == X.data_ptr()  # as is: no copy


def test_scale_multiplies():
    # [1, -2, 3] * 0.5
    assert torch.equal(passthrough([X], None, scale=[0.5]), torch.tensor([0.5, -1.0, 1.5]))


def test_scale_is_not_rounded_to_the_dtype():
    x = torch.tensor([3.0], dtype=torch.bfloat16)
    # float32: 3 * 0.9 = 2.7; bf16 steps in [2, 4) are 2^-6: 2.7 / 2^-6 = 172.8 -> 173 * 2^-6
    # = 2.703125. (0.9 rounded to bf16 first is 0.8984375: 3 * 0.8984375 = 2.6953125, a tie
    # -> 172 * 2^-6 = 2.6875.)
    out = passthrough([x], None, scale=[0.9])
    assert out.dtype == torch.bfloat16 and out.item() == 2.703125


def test_declaration():
    m = REGISTRY["passthrough"]
    assert (m.base, m.min_inputs, m.max_inputs) == ("input", 1, 1)
    assert m.param("scale").per_model and m.param("scale").default is None
