"""multislerp: golden values, base offsets, antipodal handling, declaration."""

from __future__ import annotations

import math

import pytest
import torch

from mergeflow.methods import REGISTRY
from mergeflow.methods.multislerp import multislerp

# x0 = [2, 0], x1 = [0, 1], weights [0.75, 0.25]: units e1, e2; mean [0.75, 0.25],
# ‖mean‖ = √0.625; m = [0.75, 0.25]/0.7905694 = [0.9486833, 0.3162278]; the tangent sum
# Σ w_i (u_i - (u_i·m) m) is 0 (m is along Σ w_i u_i), so the step is m itself;
# scale Σ w_i ‖x_i‖ = 0.75·2 + 0.25·1 = 1.75 -> [1.6601958, 0.5533986]
X0, X1 = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
GOLDEN = torch.tensor([1.75 * 0.75 / math.sqrt(0.625), 1.75 * 0.25 / math.sqrt(0.625)])


def test_golden_two_models():
    torch.testing.assert_close(multislerp([X0, X1], None, weight=[0.75, 0.25]), GOLDEN)


def test_weights_normalized():
    torch.testing.assert_close(multislerp([X0, X1], None, weight=[3.0, 1.0]), GOLDEN)


def test_unnormalized_weights_scale_result():
    # weights [1.5, 0.5] unnormalized: mean direction unchanged, scale 1.5·2 + 0.5·1 = 3.5
    out = multislerp([X0, X1], None, weight=[1.5, 0.5], normalize_weights=False)
    torch.testing.assert_close(out, GOLDEN * 2)


def test_golden_with_base():
    b = torch.tensor([1.0, 1.0])
    out = multislerp([X0 + b, X1 + b], b, weight=[0.75, 0.25])
    torch.testing.assert_close(out, GOLDEN + b)


def test_single_input_returned_as_is():
    b = torch.ones(2)
    out = multislerp([X0], b, weight=[1.0])
    assert torch.equal(out, X0) and out.data_ptr() == X0.data_ptr()  # as is: no copy


def test_two_antipodal_inputs_fall_back_to_weighted_sum():
    b = torch.tensor([1.0, 2.0])
    # task vectors [1, 0] and [-1, 0]: mean of units is 0 -> 0.5·[1,0] + 0.5·[-1,0] + b = b
    out = multislerp([b + X0 / 2, b - X0 / 2], b, weight=[0.5, 0.5])
    assert torch.equal(out, b)


def test_three_antipodal_inputs_error():
    e = torch.tensor([1.0, 0.0])
    with pytest.raises(ValueError, match="antipodal"):
        multislerp([e, -e, e], None, weight=[1.0, 2.0, 1.0])  # 0.25 - 0.5 + 0.25 = 0


def test_identical_inputs_give_input_back():
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(multislerp([x, x.clone(), x.clone()], None, weight=[0.2, 0.3, 0.5]), x)


def test_declaration():
    m = REGISTRY["multislerp"]
    assert (m.base, m.min_inputs, m.max_inputs, m.rectify) == ("optional", 1, None, "common")
    assert m.param("weight").required and m.param("weight").per_model
    assert m.param("normalize_weights").default is True
    assert m.param("eps").default == 1e-8
