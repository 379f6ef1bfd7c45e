"""karcher: golden means on the circle/sphere, zero handling, declaration."""

from __future__ import annotations

import math

import torch

from mergeflow.methods import REGISTRY
from mergeflow.methods.karcher import karcher


def test_golden_two_points():
    # units e1, e2: midpoint [R, R]; scale (‖x0‖ + ‖x1‖)/2 = (1 + 2)/2 = 1.5
    out = karcher([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])], None)
    r = 1.5 * math.sqrt(0.5)
    torch.testing.assert_close(out, torch.tensor([r, r]))


def test_golden_iterates_to_the_angle_mean():
    # unit vectors at angles 0, 0, π/2: the Karcher mean is at their mean angle π/6 (the
    # Euclidean start is at atan(1/2) ≈ 26.6°); scale 1 -> [cos 30°, sin 30°]
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = karcher([e1, e1.clone(), e2], None)
    torch.testing.assert_close(out, torch.tensor([math.sqrt(3) / 2, 0.5]), atol=1e-5, rtol=0)


def test_golden_three_orthogonal():
    # symmetric: [1, 1, 1]/√3, scale 1
    xs = [torch.eye(3)[i] for i in range(3)]
    torch.testing.assert_close(karcher(xs, None), torch.full((3,), 1 / math.sqrt(3)))


def test_zero_input_drops_out_but_counts_in_scale():
    # valid: [2, 0] -> direction e1; scale (2 + 0)/2 = 1
    out = karcher([torch.tensor([2.0, 0.0]), torch.zeros(2)], None)
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0]))


def test_all_zero_gives_zeros():
    assert torch.equal(karcher([torch.zeros(3), torch.zeros(3)], None), torch.zeros(3))


def test_single_input_returned_as_is():
    x = torch.ones(2)
    out = karcher([x], None)
    assert torch.equal(out, x) and out.data_ptr() == x.data_ptr()  # as is: no copy


def test_config_weights_are_ignored():
    xs = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])]
    assert torch.equal(karcher(xs, None, weight=[0.9, 0.1]), karcher(xs, None))


def test_identical_inputs_give_input_back():
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(karcher([x, x.clone()], None), x)


def test_bf16_result_dtype():
    xs = [torch.tensor([1.0, 0.0], dtype=torch.bfloat16), torch.tensor([0.0, 2.0], dtype=torch.bfloat16)]
    out = karcher(xs, None)
    # 1.5·0.7071 = 1.0607 -> bf16 1.0625
    assert out.dtype == torch.bfloat16 and out.tolist() == [1.0625, 1.0625]


def test_declaration():
    m = REGISTRY["karcher"]
    assert (m.base, m.min_inputs, m.rectify) == ("input", 1, "common")
    assert m.param("weight").default is None  # accepted from configs, ignored
    assert m.param("max_iter").type is int and m.param("max_iter").default == 10
    assert m.param("tol").default == 1e-5
