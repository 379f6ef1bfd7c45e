"""Sparsifiers: kept counts and positions, L1 rescale, DELLA probabilities, reproducibility."""

from __future__ import annotations

import pytest
import torch

from mergeflow.methods import sparsify as sp

D = torch.tensor([0.1, -0.4, 0.3, -0.2])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_density_one_returns_delta_untouched():
    g = gen(0)
    assert sp.magnitude(D, 1.0) is D
    assert sp.random(D, 1.0, generator=g) is D
    assert sp.magnitude_outliers(D, 1.0, gamma=0.1) is D
    assert sp.della_magprune(D, 1.0, epsilon=0.15, generator=g) is D


def test_magnitude_keeps_the_largest():
    # k = int(0.5 * 4) = 2: |-0.4| and |0.3| are the two largest
    assert torch.equal(sp.magnitude(D, 0.5), torch.tensor([0.0, -0.4, 0.3, 0.0]))


def test_magnitude_rescale_matches_l1():
    # Σ|d| = 0.1+0.4+0.3+0.2 = 1.0, Σ|kept| = 0.7, scale 1/0.7:
    # -0.4/0.7 = -0.5714286, 0.3/0.7 = 0.4285714
    out = sp.magnitude(D, 0.5, rescale=True)
    torch.testing.assert_close(out, torch.tensor([0.0, -0.5714286, 0.4285714, 0.0]))
    torch.testing.assert_close(out.abs().sum(), D.abs().sum())


def test_magnitude_zero_k_gives_zero_delta():
    # deviation: int(0.2 * 4) = 0 entries kept -> all zero, no crash
    assert torch.equal(sp.magnitude(D, 0.2, rescale=True).abs(), torch.zeros(4))


def test_magnitude_ties_keep_k_of_the_tied():
    d = torch.tensor([1.0, -1.0, 1.0, 0.5])
    # k = 2 of the three entries with |d| = 1; 0.5 is never kept
    out = sp.magnitude(d, 0.5)
    assert int((out != 0).sum()) == 2 and out[3] == 0 and set(out[out != 0].abs().tolist()) == {1.0}


def tie_heavy_bf16(n: int = 4096) -> torch.Tensor:
    """A bf16 delta with only 8 distinct magnitudes, so every cut falls inside a tie."""
    g = torch.Generator().manual_seed(3)
    return ((torch.randint(-8, 8, (n,), generator=g) + 0.5) / 64).to(torch.bfloat16)


def test_magnitude_tie_order_is_mergekits():
    # mergekit 0.1.5: argsort(|d| as float32, descending) (torch's default sort), first k kept
    d = tie_heavy_bf16()
    for density in (0.3, 0.5, 0.9):
        k = int(density * d.numel())
        expected = torch.zeros(d.numel(), dtype=torch.bool)
        expected[torch.argsort(d.abs().float(), descending=True)[:k]] = True
        assert torch.equal(sp.magnitude(d, density) != 0, expected)


def test_magnitude_outliers_tie_order_is_mergekits():
    # mergekit 0.1.5: argsort(|d| as float32) ascending, positions bottom .. bottom+keep-1
    d = tie_heavy_bf16()
    n, keep, top = d.numel(), int(0.5 * 4096), int(0.05 * 4096)
    bottom = n - keep - top
    expected = torch.zeros(n, dtype=torch.bool)
    expected[torch.argsort(d.abs().float())[bottom : bottom + keep]] = True
    assert torch.equal(sp.magnitude_outliers(d, 0.5, gamma=0.05) != 0, expected)


def test_magnitude_keeps_documented_count():
    d = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    for density in (0.01, 0.25, 0.5, 0.999):
        assert int((sp.magnitude(d, density) != 0).sum()) == int(density * 1000)


def test_magnitude_outliers_drops_both_ends():
    d = torch.arange(1.0, 11.0).flip(0)  # magnitudes 10..1, so positions are not sorted
    # N=10, keep=int(0.5*10)=5, top=int(0.1*10)=1, bottom=10-5-1=4:
    # ascending magnitudes 1..10, keep positions 4..8 -> values 5,6,7,8,9
    out = sp.magnitude_outliers(d, 0.5, gamma=0.1)
    assert sorted(out[out != 0].tolist()) == [5.0, 6.0, 7.0, 8.0, 9.0]


def test_magnitude_outliers_shrinks_top_when_needed():
    d = torch.arange(1.0, 11.0)
    # keep=9, top=2, bottom=10-9-2=-1 -> top=1, bottom=0: keep 1..9
    out = sp.magnitude_outliers(d, 0.9, gamma=0.2)
    assert out.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]


def test_magnitude_outliers_gamma_zero_keeps_upper_end():
    d = torch.arange(1.0, 11.0)
    # deviation: keep=int(0.3*10)=3, top=0, bottom=7 -> 8, 9, 10 (not an all-zero delta)
    assert sp.magnitude_outliers(d, 0.3, gamma=0.0).tolist() == [0] * 7 + [8, 9, 10]


def test_magnitude_outliers_rescale_matches_l1():
    d = torch.arange(1.0, 11.0)
    out = sp.magnitude_outliers(d, 0.5, gamma=0.1, rescale=True)
    # kept 5..9 sum 35, Σ|d| = 55 -> scale 55/35
    torch.testing.assert_close(out[4:9], torch.arange(5.0, 10.0) * 55 / 35)
    torch.testing.assert_close(out.abs().sum(), torch.tensor(55.0))


def test_random_keep_rate_and_rescale():
    d = torch.randn(200_000, generator=torch.Generator().manual_seed(2))
    out = sp.random(d, 0.3, generator=gen(0), rescale=True)
    assert abs(float((out != 0).float().mean()) - 0.3) < 0.01
    torch.testing.assert_close(out.abs().sum(), d.abs().sum(), rtol=1e-5, atol=0)


def test_random_reproducible_and_seed_dependent():
    d = torch.randn(1000)
    a = sp.random(d, 0.5, generator=gen(3))
    b = sp.random(d, 0.5, generator=gen(3))
    c = sp.random(d, 0.5, generator=gen(4))
    assert torch.equal(a, b)
    assert not torch.equal(a != 0, c != 0)


def test_della_probabilities_by_rank():
    # |d| ranks (0 = smallest): 0.1->0, 0.4->3, 0.3->2, 0.2->1
    # p = (0.5 - 0.1) + 2*0.1*rank/(4-1) = 0.4 + 0.2*rank/3
    p = sp.della_probabilities(D, 0.5, 0.1)
    torch.testing.assert_close(p, torch.tensor([[0.4, 0.6, 0.4 + 0.4 / 3, 0.4 + 0.2 / 3]]))


def test_della_probabilities_per_row_and_single_element_rows():
    d = torch.tensor([[3.0, 1.0], [-1.0, 2.0]])
    # each row: smaller |d| -> 0.4, larger -> 0.6
    torch.testing.assert_close(sp.della_probabilities(d, 0.5, 0.1), torch.tensor([[0.6, 0.4], [0.4, 0.6]]))
    torch.testing.assert_close(sp.della_probabilities(torch.tensor([[5.0]]), 0.5, 0.1), torch.tensor([[0.5]]))


def test_della_keep_rate_follows_rank():
    rows, n = 100, 2000
    d = torch.randn(rows, n, generator=torch.Generator().manual_seed(5))
    kept = sp.della_magprune(d, 0.5, epsilon=0.1, generator=gen(0)) != 0
    order = d.abs().argsort(dim=1)
    by_rank = torch.gather(kept, 1, order).float()  # column j = rank j
    # lowest decile: mean p = 0.4 + 0.2 * 0.05 = 0.41; highest: 0.4 + 0.2 * 0.95 = 0.59
    assert abs(float(by_rank[:, : n // 10].mean()) - 0.41) < 0.015
    assert abs(float(by_rank[:, -n // 10 :].mean()) - 0.59) < 0.015
    assert abs(float(kept.float().mean()) - 0.5) < 0.01


def test_della_rescale_matches_l1():
    d = torch.randn(50, 400, generator=torch.Generator().manual_seed(6))
    out = sp.della_magprune(d, 0.4, epsilon=0.2, generator=gen(0), rescale=True)
    torch.testing.assert_close(out.abs().sum(), d.abs().sum(), rtol=1e-5, atol=0)


def test_della_bounds():
    assert sp.della_bounds_error(1.0, 0.15) is None  # density 1: nothing pruned
    assert sp.della_bounds_error(0.5, 0.1) is None
    assert "density - epsilon" in sp.della_bounds_error(0.1, 0.15)
    assert sp.della_bounds_error(0.9, 0.1) is not None  # 0.9 + 0.1 = 1 is not < 1
    with pytest.raises(ValueError, match="epsilon"):
        sp.della_magprune(D, 0.1, epsilon=0.15, generator=gen(0))


def test_rescale_redoes_overflowing_sums_in_float32():
    # Σ|d| = 100000 overflows float16 (max 65504); kept sum 50000; scale 2 (deviation: no NaN)
    d = torch.ones(100_000, dtype=torch.float16)
    out = sp.magnitude(d, 0.5, rescale=True)
    assert out.dtype == torch.float16
    assert sorted(set(out.tolist())) == [0.0, 2.0]


def test_dispatch_errors():
    with pytest.raises(ValueError, match="unknown sparsifier"):
        sp.sparsify(D, "nope", density=0.5, rescale=False)
    with pytest.raises(ValueError, match="generator"):
        sp.sparsify(D, "random", density=0.5, rescale=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_random_masks_are_device_independent():
    d = torch.randn(64, 128)
    for method, extra in (("random", {}), ("della_magprune", {"epsilon": 0.1})):
        cpu = sp.sparsify(d, method, density=0.5, rescale=True, generator=gen(1), **extra)
        gpu = sp.sparsify(d.cuda(), method, density=0.5, rescale=True, generator=gen(1), **extra)
        assert torch.equal(cpu != 0, gpu.cpu() != 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("n", [5, 17, 1000, 70_000])
def test_magnitude_order_is_torchs_float_sort(dtype, n):
    # The integer-key sort must give the same permutation as mergekit's float32 argsort,
    # ties included, in both directions (n = 70,000 is past torch's parallel grain size).
    g = torch.Generator().manual_seed(n)
    d = (torch.randint(-6, 7, (n,), generator=g) * 0.25).to(dtype)  # heavy ties, zeros, -0
    d[torch.rand(n, generator=g) < 0.3] *= 1.0 + 1 / 64  # and a second family of magnitudes
    for descending in (True, False):
        expected = torch.argsort(d.abs().float(), descending=descending)
        assert torch.equal(sp.magnitude_order(d, descending=descending), expected)


def test_magnitude_order_with_nan_is_torchs_float_sort():
    d = torch.tensor([1.0, float("nan"), -2.0, 0.5, float("nan"), 1.0])
    for descending in (True, False):
        expected = torch.argsort(d.abs(), descending=descending)
        assert torch.equal(sp.magnitude_order(d, descending=descending), expected)
