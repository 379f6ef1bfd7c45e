"""linear and the shared float32-once summation helpers."""

from __future__ import annotations

import pytest
import torch

from mergeflow.methods import REGISTRY
from mergeflow.methods.linear import linear, rounded_sum, weighted_sum

A = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
B = torch.tensor([[5.0, 6.0], [7.0, 8.0]])


def test_golden_normalized():
    # (1*A + 3*B) / 4 = [[(1+15)/4, (2+18)/4], [(3+21)/4, (4+24)/4]]
    out = linear([A, B], None, weight=[1.0, 3.0], normalize=True)
    assert torch.equal(out, torch.tensor([[4.0, 5.0], [6.0, 7.0]]))


def test_golden_unnormalized():
    # 0.5*A + 2*B
    out = linear([A, B], None, weight=[0.5, 2.0], normalize=False)
    assert torch.equal(out, torch.tensor([[10.5, 13.0], [15.5, 18.0]]))


def test_normalization_is_scale_invariant():
    assert torch.equal(linear([A, B], None, weight=[1.0, 3.0], normalize=True),
                       linear([A, B], None, weight=[2.0, 6.0], normalize=True))


def test_identical_inputs_give_input_back():
    assert torch.equal(linear([A, A, A], None, weight=[0.2, 0.3, 0.5], normalize=True), A)


def test_zero_weight_sum_is_an_error():
    with pytest.raises(ValueError, match="sum to 0"):
        linear([A, B], None, weight=[1.0, -1.0], normalize=True)


def test_bf16_weight_rounding_is_visible():
    x = torch.ones(2, dtype=torch.bfloat16)
    # 0.3 as a bf16 tensor is 0.30078125
    assert linear([x], None, weight=[0.3], normalize=False).tolist() == [0.30078125] * 2


def test_rounded_sum_accumulates_in_float32_once():
    terms = [torch.tensor([v], dtype=torch.bfloat16) for v in (256.0, 1.0, 1.0)]
    # 256 + 1 + 1 = 258 exactly in float32, a bf16 value; step-wise bf16 would stay at 256
    assert rounded_sum(terms).item() == 258.0
    assert rounded_sum(terms).dtype == torch.bfloat16


def test_rounded_sum_starts_from_positive_zero():
    out = rounded_sum([torch.tensor([-0.0]), torch.tensor([-0.0])])
    assert not torch.signbit(out).any()  # like torch's sum(0)


def test_float64_keeps_its_precision():
    x = torch.tensor([1.0], dtype=torch.float64)
    tiny = torch.tensor([1e-12], dtype=torch.float64)
    # 1 + 1e-12 is representable in float64 but not float32
    assert weighted_sum([x, tiny], [1.0, 1.0]).item() == 1.0 + 1e-12


def test_declaration():
    m = REGISTRY["linear"]
    assert (m.base, m.rectify, m.min_inputs, m.max_inputs) == ("input", "common", 1, None)
    assert m.param("weight").required and m.param("weight").per_model
    assert m.param("normalize").default is True and not m.param("normalize").per_model
