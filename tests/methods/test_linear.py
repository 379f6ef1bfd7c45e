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


def test_bf16_weights_stay_float32():
    x = torch.full((2,), 3.0, dtype=torch.bfloat16)
    # float32: 3 * 0.3 = 0.9000000358; bf16 steps in [0.5, 1) are 2^-8, 0.9 / 2^-8 = 230.4
    # -> 230 * 2^-8 = 0.8984375. (A weight first rounded to bf16, 0.30078125, would give
    # 3 * 0.30078125 = 0.90234375.)
    assert linear([x], None, weight=[0.3], normalize=False).tolist() == [0.8984375] * 2


def test_bf16_divides_in_float32_and_rounds_once():
    x0 = torch.tensor([1.0], dtype=torch.bfloat16)
    x1 = torch.tensor([0.0087890625], dtype=torch.bfloat16)  # 9/1024, exact in bf16
    # float32: (1 + 2 * 0.0087890625) / 3 = 1.017578125 / 3 = 0.33919271;
    # bf16 steps in [0.25, 0.5) are 2^-9: 0.33919271 / 2^-9 = 173.67 -> 174 * 2^-9 = 0.33984375.
    # (Rounding the sum first: 1.017578125 -> 1.015625 (steps 2^-7), / 3 = 0.33854167,
    # / 2^-9 = 173.33 -> 0.337890625.)
    assert linear([x0, x1], None, weight=[1.0, 2.0], normalize=True).item() == 0.33984375


def test_rounded_sum_accumulates_in_float32_once():
    terms = [torch.tensor([v], dtype=torch.bfloat16) for v in (256.0, 1.0, 1.0)]
    # 256 + 1 + 1 = 258 exactly in float32, a bf16 value; step-wise bf16 would stay at 256
    assert rounded_sum(terms).item() == 258.0
    assert rounded_sum(terms).dtype == torch.bfloat16


def test_rounded_sum_starts_from_positive_zero():
    out = rounded_sum([torch.tensor([-0.0]), torch.tensor([-0.0])])
    assert not torch.signbit(out).any()  # like torch's sum(0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_rounded_sum_is_torchs_stacked_sum(dtype, count):
    # mergekit's formula, bit for bit (-0 included), for the one/two-term fast path and the
    # float32 accumulator alike
    g = torch.Generator().manual_seed(count)
    terms = [(torch.randn(10_000, generator=g) * 4 ** torch.randint(-6, 6, (10_000,), generator=g))
             .to(dtype) for _ in range(count)]
    for t in terms:
        t[::7] = -0.0
    expected = torch.stack(terms).sum(0)
    assert torch.equal(rounded_sum(terms).view(torch.uint8), expected.view(torch.uint8))


def test_float64_keeps_its_precision():
    x = torch.tensor([1.0], dtype=torch.float64)
    tiny = torch.tensor([1e-12], dtype=torch.float64)
    # 1 + 1e-12 is representable in float64 but not float32
    assert weighted_sum([x, tiny], [1.0, 1.0]).item() == 1.0 + 1e-12


def test_weighted_sum_is_float32_and_unrounded():
    xs = [torch.tensor([v], dtype=torch.bfloat16) for v in (256.0, 1.0)]
    # 256 * 1 + 1 * 0.5 = 256.5 in float32 (bf16 would round it to 256)
    out = weighted_sum(xs, [1.0, 0.5])
    assert out.dtype == torch.float32 and out.item() == 256.5


def test_declaration():
    m = REGISTRY["linear"]
    assert (m.base, m.rectify, m.min_inputs, m.max_inputs) == ("input", "common", 1, None)
    assert m.param("weight").required and m.param("weight").per_model
    assert m.param("normalize").default is True and not m.param("normalize").per_model
