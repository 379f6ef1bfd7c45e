"""ram and ramplus_tl: golden values, dtype, declaration."""

from __future__ import annotations

import torch

from mergeflow.methods import REGISTRY
from mergeflow.methods.ram import ram, ramplus_tl

B = torch.zeros(4)
X0 = torch.tensor([1.0, 2.0, 0.0, 0.0])
X1 = torch.tensor([3.0, 0.0, 5.0, 4.0])
# active a0 = [T, T, F, F], a1 = [T, F, T, T]; counts c = [2, 1, 1, 1]


def test_ram_golden():
    # pos0 overlaps: (1 + 3)/2 = 2; pos1 unique 2; pos2 unique 5; pos3 unique 4
    assert torch.equal(ram([X0, X1], B), torch.tensor([2.0, 2.0, 5.0, 4.0]))


def test_ram_epsilon_threshold():
    # epsilon 1.5: a0 = [F, T, F, F], a1 = [T, F, T, T]; every active entry is unique
    assert torch.equal(ram([X0, X1], B, epsilon=1.5), torch.tensor([3.0, 2.0, 5.0, 4.0]))


def test_ramplus_golden():
    # rho0 = #(a0 & c>1)/#(a0 & c==1) = 1/1 = 1; rho1 = 1/2 (unique at pos2, pos3)
    # alpha 1, r 0.1: lambda0 = 1 + 0.1·1 = 1.1, lambda1 = 1 + 0.1·0.5 = 1.05
    # pos0: (1+3)/2 = 2; pos1: 2·1.1 = 2.2; pos2: 5·1.05 = 5.25; pos3: 4·1.05 = 4.2
    out = ramplus_tl([X0, X1], B, r=0.1, alpha=1.0)
    torch.testing.assert_close(out, torch.tensor([2.0, 2.2, 5.25, 4.2]))


def test_ramplus_alpha_caps_rho():
    # default alpha 0.2 caps both rho -> lambda = 1 + 0.1·0.2 = 1.02 for both
    out = ramplus_tl([X0, X1], B)
    torch.testing.assert_close(out, torch.tensor([2.0, 2.04, 5.1, 4.08]))


def test_ramplus_result_in_compute_dtype():
    b = torch.zeros(4, dtype=torch.bfloat16)
    out = ramplus_tl([X0.bfloat16(), X1.bfloat16()], b)
    # deviation: bf16 in, bf16 out (mergekit: float32); 2.04 -> bf16 2.046875
    assert out.dtype == torch.bfloat16
    assert out.tolist() == [2.0, 2.046875, 5.09375, 4.09375]


def test_identical_inputs_give_input_back():
    g = torch.Generator().manual_seed(0)
    b, x = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    torch.testing.assert_close(ram([x, x.clone()], b), x)
    assert torch.equal(ramplus_tl([b.clone(), b.clone()], b), b)


def test_declarations():
    for name in ("ram", "ramplus_tl"):
        m = REGISTRY[name]
        assert (m.base, m.min_inputs, m.rectify) == ("required", 0, "base")
        assert m.param("epsilon").default == 1e-5 and m.param("epsilon").check(-1) is not None
    m = REGISTRY["ramplus_tl"]
    assert (m.param("r").default, m.param("alpha").default) == (0.1, 0.2)
