"""nuslerp: weight ratio, task vectors from a base, vector layouts, colinear fallback."""

from __future__ import annotations

import math

import pytest
import torch

from mergeflow.methods import REGISTRY
from mergeflow.methods.nuslerp import nuslerp

R = math.sqrt(0.5)
E1, E2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
# non-flatten layouts: rows of M0 = [[1, 0], [1, 0]] and M1 = [[0, 1], [2, 0]]
M0 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
M1 = torch.tensor([[0.0, 1.0], [2.0, 0.0]])


def test_golden_weight_ratio():
    # t = 3 / (1 + 3) = 0.75, θ = π/2: sin(π/8)·e1 + sin(3π/8)·e2
    out = nuslerp([E1, E2], None, weight=[1.0, 3.0])
    torch.testing.assert_close(out, torch.tensor([math.sin(math.pi / 8), math.sin(3 * math.pi / 8)]))


def test_golden_with_base():
    # task vectors [2,1]-[1,1] = e1 and [1,2]-[1,1] = e2; t = 0.5 -> b + [R, R]
    b = torch.tensor([1.0, 1.0])
    out = nuslerp([torch.tensor([2.0, 1.0]), torch.tensor([1.0, 2.0])], b, weight=[1.0, 1.0])
    torch.testing.assert_close(out, torch.tensor([1 + R, 1 + R]))


def test_zero_weight_sum_means_half():
    torch.testing.assert_close(nuslerp([E1, E2], None, weight=[1.0, -1.0]), torch.tensor([R, R]))


def test_antipodal_vectors_lerp():
    # cos = -1: colinear, (1 - 0.5)·e1 + 0.5·(-e1) = 0 (no division by sin(π) ≈ 8.7e-8)
    assert torch.equal(nuslerp([E1, -E1], None, weight=[1.0, 1.0]), torch.zeros(2))


def test_golden_last_dim_rows():
    # row 0: e1 vs e2 orthogonal -> [R, R]; row 1: [1,0] vs [2,0] parallel -> lerp [1.5, 0]
    out = nuslerp([M0, M1], None, weight=[1.0, 1.0], nuslerp_flatten=False)
    torch.testing.assert_close(out, torch.tensor([[R, R], [1.5, 0.0]]))


def test_golden_row_wise_columns():
    # column 0: [1,1] vs [0,2]: cos = 2/(√2·2) = 1/√2, θ = π/4,
    #   coefficient sin(π/8)/sin(π/4) = 0.3826834/0.7071068 = 0.5411961 on both -> [0.5411961, 1.6235883]
    # column 1: [0,0] vs [1,0]: u0 = 0, cos = 0, θ = π/2 -> sin(π/4)·[1, 0] = [R, 0]
    out = nuslerp([M0, M1], None, weight=[1.0, 1.0], nuslerp_flatten=False, nuslerp_row_wise=True)
    torch.testing.assert_close(out, torch.tensor([[0.5411961, R], [1.6235883, 0.0]]))


def test_golden_flattened():
    # v0 = [1,0,1,0], v1 = [0,1,2,0]: cos = 2/(√2·√5) = 0.6324555, sin θ = √0.6 = 0.7745967,
    # sin(θ/2) = √((1-cos)/2) = 0.4286865; coefficient 0.4286865/0.7745967 = 0.5534322
    # r = 0.5534322·(v0 + v1) = 0.5534322·[1, 1, 3, 0]
    out = nuslerp([M0, M1], None, weight=[1.0, 1.0])
    c = 0.5534322
    torch.testing.assert_close(out, torch.tensor([[c, c], [3 * c, 0.0]]))


def test_identical_inputs_give_input_back():
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(nuslerp([x, x.clone()], None, weight=[0.3, 0.7]), x)


def test_needs_two_models():
    with pytest.raises(ValueError, match="exactly two"):
        nuslerp([E1], None, weight=[1.0])


def test_declaration():
    m = REGISTRY["nuslerp"]
    assert (m.base, m.min_inputs, m.max_inputs, m.rectify) == ("optional", 2, 2, "common")
    assert m.param("weight").required and m.param("weight").per_model
    assert m.param("nuslerp_flatten").default is True
    assert m.param("nuslerp_row_wise").default is False
