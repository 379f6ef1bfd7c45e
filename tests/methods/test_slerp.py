"""slerp: golden values, endpoints, lerp fallback, dtype handling, declaration."""

from __future__ import annotations

import math

import pytest
import torch

from mergeflow.methods import REGISTRY
from mergeflow.methods.slerp import slerp

R = math.sqrt(0.5)  # sin(pi/4)


def test_golden_orthogonal_unit_vectors():
    # θ = π/2, t = 0.5: sin(π/4)/sin(π/2) * b + sin(π/4)/sin(π/2) * x
    out = slerp([torch.tensor([0.0, 1.0])], torch.tensor([1.0, 0.0]), t=0.5)
    torch.testing.assert_close(out, torch.tensor([R, R]))


def test_coefficients_apply_to_raw_tensors():
    # b = [2, 0], x = [0, 1]: θ = π/2; r = sin(π/4)·[2, 0] + sin(π/4)·[0, 1]
    out = slerp([torch.tensor([0.0, 1.0])], torch.tensor([2.0, 0.0]), t=0.5)
    torch.testing.assert_close(out, torch.tensor([2 * R, R]))


def test_golden_quarter():
    # θ = π/2, t = 0.25: coefficients sin(3π/8) on b, sin(π/8) on x
    out = slerp([torch.tensor([[0.0, 1.0]])], torch.tensor([[1.0, 0.0]]), t=0.25)
    torch.testing.assert_close(out, torch.tensor([[math.sin(3 * math.pi / 8), math.sin(math.pi / 8)]]))


def test_parallel_tensors_lerp():
    # cos = 1 > 0.9995: (1 - 0.25)·[1, 1] + 0.25·[2, 2] = [1.25, 1.25]
    out = slerp([torch.tensor([2.0, 2.0])], torch.tensor([1.0, 1.0]), t=0.25)
    torch.testing.assert_close(out, torch.tensor([1.25, 1.25]))


def test_endpoints_are_exact():
    g = torch.Generator().manual_seed(0)
    b, x = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    assert torch.equal(slerp([x], b, t=0.0), b)
    assert torch.equal(slerp([x], b, t=1.0), x)


def test_identical_inputs_give_input_back():
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    # lerp branch (cos = 1): 0.7x + 0.3x, exact up to float32 rounding
    torch.testing.assert_close(slerp([x.clone()], x, t=0.3), x)
    xb = x.to(torch.bfloat16)
    assert torch.equal(slerp([xb.clone()], xb, t=0.3), xb)  # float32 error vanishes in bf16


def test_zero_tensor_left_as_is():
    # ‖b‖ = 0 <= 1e-8: b is not normalised; cos = 0, θ = π/2 -> sin(π/4)·x at t = 0.5
    out = slerp([torch.tensor([0.0, 2.0])], torch.zeros(2), t=0.5)
    torch.testing.assert_close(out, torch.tensor([0.0, 2 * R]))


def test_bf16_computed_in_float32_cast_back():
    b = torch.tensor([1.0, 0.0], dtype=torch.bfloat16)
    x = torch.tensor([0.0, 1.0], dtype=torch.bfloat16)
    out = slerp([x], b, t=0.5)
    assert out.dtype == torch.bfloat16
    # 0.70710677 rounds to bf16 0.70703125
    assert out.tolist() == [0.70703125, 0.70703125]


def test_needs_exactly_one_other():
    with pytest.raises(ValueError, match="exactly one"):
        slerp([torch.zeros(2), torch.zeros(2)], torch.zeros(2), t=0.5)


def test_declaration():
    m = REGISTRY["slerp"]
    assert (m.base, m.min_inputs, m.max_inputs, m.rectify) == ("required", 1, 1, "common")
    t = m.param("t")
    assert t.required and not t.per_model
    assert "t must be <= 1" in t.check(1.5)
    assert t.check(-0.1) is not None
    assert t.check(0.0) is None and t.check(1.0) is None


def test_norm_and_cosine_span_segments():
    # a = e_0 + e_C, b = e_0 with C = SEGMENT (the second segment): ‖a‖ = √2, ‖b‖ = 1,
    # cos = 1/√2, θ = π/4; t = 0.5: both coefficients c = sin(π/8)/sin(π/4) = 0.5411961,
    # r[0] = 2c = 1.0823922, r[C] = c = 0.5411961 (a first segment alone would give cos = 1, lerp)
    from mergeflow.methods.passes import SEGMENT as CHUNK

    a, b = torch.zeros(CHUNK + 3), torch.zeros(CHUNK + 3)
    a[0] = a[CHUNK] = 1.0
    b[0] = 1.0
    out = slerp([b], a, t=0.5)
    c = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    torch.testing.assert_close(out[[0, CHUNK]], torch.tensor([2 * c, c]))
    assert int((out != 0).sum()) == 2
