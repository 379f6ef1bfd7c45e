"""Sparsifiers: kept counts and positions, L1 rescale, DELLA probabilities, reproducibility."""

from __future__ import annotations

import pytest
import torch

from mergeflow.methods import sparsify as sp

D = torch.tensor([0.1, -0.4, 0.3, -0.2])


def mag(d, density, rescale=False):
    return sp.sparsify(d, "magnitude", density=density, rescale=rescale)


def outliers(d, density, gamma, rescale=False):
    return sp.sparsify(d, "magnitude_outliers", density=density, gamma=gamma, rescale=rescale)


def rand(d, density, key, rescale=False):
    return sp.sparsify(d, "random", density=density, key=key, rescale=rescale)


def della(d, density, epsilon, key, rescale=False):
    return sp.sparsify(d, "della_magprune", density=density, epsilon=epsilon, key=key, rescale=rescale)


def test_density_one_returns_delta_untouched():
    for out in (mag(D, 1.0), rand(D, 1.0, 0), outliers(D, 1.0, 0.1), della(D, 1.0, 0.15, 0)):
        assert torch.equal(out, D)


def test_magnitude_keeps_the_largest():
    # k = int(0.5 * 4) = 2: |-0.4| and |0.3| are the two largest
    assert torch.equal(mag(D, 0.5), torch.tensor([0.0, -0.4, 0.3, 0.0]))


def test_magnitude_rescale_matches_l1():
    # Σ|d| = 0.1+0.4+0.3+0.2 = 1.0, Σ|kept| = 0.7, scale 1/0.7:
    # -0.4/0.7 = -0.5714286, 0.3/0.7 = 0.4285714
    out = mag(D, 0.5, rescale=True)
    torch.testing.assert_close(out, torch.tensor([0.0, -0.5714286, 0.4285714, 0.0]))
    torch.testing.assert_close(out.abs().sum(), D.abs().sum())


def test_magnitude_zero_k_keeps_the_largest():
    # int(0.2 * 4) = 0, but a positive density keeps at least one entry (as mergekit 0.1.5,
    # whose test_sparsify_small_tensor_retains_largest expects it): -0.4; rescaled by 1.0/0.4
    assert torch.equal(mag(D, 0.2), torch.tensor([0.0, -0.4, 0.0, 0.0]))
    assert torch.equal(mag(D, 0.2, rescale=True), torch.tensor([0.0, -1.0, 0.0, 0.0]))


def test_magnitude_ties_keep_the_lowest_indices():
    d = torch.tensor([1.0, -1.0, 1.0, 0.5])
    # k = 2 of the three entries with |d| = 1: the first two by flat index (METHODS.md, "Top-k")
    assert torch.equal(mag(d, 0.5), torch.tensor([1.0, -1.0, 0.0, 0.0]))


def tie_heavy(n: int = 4096, dtype=torch.bfloat16) -> torch.Tensor:
    """A delta with only 8 distinct magnitudes, so every cut falls inside a tie."""
    g = torch.Generator().manual_seed(3)
    return ((torch.randint(-8, 8, (n,), generator=g) + 0.5) / 64).to(dtype)


def ranked(d: torch.Tensor) -> torch.Tensor:
    """Flat indices by |d| descending, equal magnitudes lower index first (a stable sort)."""
    return torch.argsort(-d.abs().float().reshape(-1), stable=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_magnitude_ties_at_the_cut_follow_the_index_rule(dtype):
    d = tie_heavy(dtype=dtype)
    for density in (0.3, 0.5, 0.9):
        k = int(density * d.numel())
        expected = torch.zeros(d.numel(), dtype=torch.bool)
        expected[ranked(d)[:k]] = True
        assert torch.equal(mag(d, density) != 0, expected)


def test_magnitude_outliers_ties_follow_the_index_rule():
    d = tie_heavy()
    keep, top = int(0.5 * 4096), int(0.05 * 4096)
    expected = torch.zeros(d.numel(), dtype=torch.bool)
    expected[ranked(d)[top : top + keep]] = True
    assert torch.equal(outliers(d, 0.5, 0.05) != 0, expected)


def test_magnitude_keeps_documented_count():
    d = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    for density in (0.01, 0.25, 0.5, 0.999):
        assert int((mag(d, density) != 0).sum()) == int(density * 1000)


def test_magnitude_outliers_drops_both_ends():
    d = torch.arange(1.0, 11.0).flip(0)  # magnitudes 10..1, so positions are not sorted
    # N=10, keep=int(0.5*10)=5, top=int(0.1*10)=1, bottom=10-5-1=4:
    # ascending magnitudes 1..10, keep positions 4..8 -> values 5,6,7,8,9
    out = outliers(d, 0.5, 0.1)
    assert sorted(out[out != 0].tolist()) == [5.0, 6.0, 7.0, 8.0, 9.0]


def test_magnitude_outliers_shrinks_top_when_needed():
    d = torch.arange(1.0, 11.0)
    # keep=9, top=2, bottom=10-9-2=-1 -> top=1, bottom=0: keep 1..9
    assert outliers(d, 0.9, 0.2).tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]


def test_magnitude_outliers_gamma_zero_keeps_upper_end():
    d = torch.arange(1.0, 11.0)
    # keep=int(0.3*10)=3, top=0, bottom=7 -> 8, 9, 10 (as mergekit 0.1.5)
    assert outliers(d, 0.3, 0.0).tolist() == [0] * 7 + [8, 9, 10]


def test_magnitude_outliers_rescale_matches_l1():
    d = torch.arange(1.0, 11.0)
    out = outliers(d, 0.5, 0.1, rescale=True)
    # kept 5..9 sum 35, Σ|d| = 55 -> scale 55/35
    torch.testing.assert_close(out[4:9], torch.arange(5.0, 10.0) * 55 / 35)
    torch.testing.assert_close(out.abs().sum(), torch.tensor(55.0))


def test_random_keep_rate_and_rescale():
    d = torch.randn(200_000, generator=torch.Generator().manual_seed(2))
    out = rand(d, 0.3, key=0, rescale=True)
    assert abs(float((out != 0).float().mean()) - 0.3) < 0.01
    torch.testing.assert_close(out.abs().sum(), d.abs().sum(), rtol=1e-5, atol=0)


def test_random_reproducible_and_key_dependent():
    d = torch.randn(1000)
    a, b, c = rand(d, 0.5, key=3), rand(d, 0.5, key=3), rand(d, 0.5, key=4)
    assert torch.equal(a, b)
    assert not torch.equal(a != 0, c != 0)


def test_della_probabilities_by_rank():
    # |d| ranks (0 = smallest): 0.1->0, 0.4->3, 0.3->2, 0.2->1
    # p = (0.5 - 0.1) + 2*0.1*rank/(4-1) = 0.4 + 0.2*rank/3
    p = sp.della_probabilities(D, 0.5, 0.1)
    torch.testing.assert_close(p, torch.tensor([0.4, 0.6, 0.4 + 0.4 / 3, 0.4 + 0.2 / 3]))


def test_della_probabilities_per_row_and_single_element_rows():
    d = torch.tensor([[3.0, 1.0], [-1.0, 2.0]])
    # each row: smaller |d| -> 0.4, larger -> 0.6
    torch.testing.assert_close(sp.della_probabilities(d, 0.5, 0.1), torch.tensor([[0.6, 0.4], [0.4, 0.6]]))
    torch.testing.assert_close(sp.della_probabilities(torch.tensor([[5.0]]), 0.5, 0.1), torch.tensor([[0.5]]))


def test_della_probabilities_of_a_3d_tensor_rank_along_dim_1():
    d = torch.tensor([[[1.0, 4.0], [2.0, 3.0]]])  # rows along dim 1: (1, 2) and (4, 3)
    torch.testing.assert_close(sp.della_probabilities(d, 0.5, 0.1), torch.tensor([[[0.4, 0.6], [0.6, 0.4]]]))


def test_della_keep_rate_follows_rank():
    rows, n = 100, 2000
    d = torch.randn(rows, n, generator=torch.Generator().manual_seed(5))
    kept = della(d, 0.5, 0.1, key=0) != 0
    order = d.abs().argsort(dim=1)
    by_rank = torch.gather(kept, 1, order).float()  # column j = rank j
    # lowest decile: mean p = 0.4 + 0.2 * 0.05 = 0.41; highest: 0.4 + 0.2 * 0.95 = 0.59
    assert abs(float(by_rank[:, : n // 10].mean()) - 0.41) < 0.015
    assert abs(float(by_rank[:, -n // 10 :].mean()) - 0.59) < 0.015
    assert abs(float(kept.float().mean()) - 0.5) < 0.01


def test_della_rescale_matches_l1():
    d = torch.randn(50, 400, generator=torch.Generator().manual_seed(6))
    out = della(d, 0.4, 0.2, key=0, rescale=True)
    torch.testing.assert_close(out.abs().sum(), d.abs().sum(), rtol=1e-5, atol=0)


def test_della_bounds():
    assert sp.della_bounds_error(1.0, 0.15) is None  # density 1: nothing pruned
    assert sp.della_bounds_error(0.5, 0.1) is None
    assert "density - epsilon" in sp.della_bounds_error(0.1, 0.15)
    assert sp.della_bounds_error(0.9, 0.1) is not None  # 0.9 + 0.1 = 1 is not < 1
    with pytest.raises(ValueError, match="epsilon"):
        della(D, 0.1, 0.15, key=0)


def test_rescale_redoes_overflowing_sums_in_float32():
    # Σ|d| = 100000 overflows float16 (max 65504); kept sum 50000; scale 2 (deviation: no NaN)
    d = torch.ones(100_000, dtype=torch.float16)
    out = mag(d, 0.5, rescale=True)
    assert out.dtype == torch.float16
    assert sorted(set(out.tolist())) == [0.0, 2.0]
    assert torch.equal(out[:50_000], torch.full((50_000,), 2.0, dtype=torch.float16))  # index rule


def test_dispatch_errors():
    with pytest.raises(ValueError, match="unknown sparsifier"):
        sp.sparsify(D, "nope", density=0.5, rescale=False)
    with pytest.raises(ValueError, match="stream key"):
        sp.sparsify(D, "random", density=0.5, rescale=False)


@pytest.mark.parametrize("method,extra", [("magnitude", {}), ("magnitude_outliers", {"gamma": 0.05}),
                                          ("random", {"key": 7}), ("della_magprune", {"epsilon": 0.1, "key": 7})])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunked_equals_whole(method, extra, dtype):
    d = tie_heavy(64 * 48, dtype).reshape(64, 48)
    prune = sp.plan_prune(0, method, d.numel(), density=0.4, rescale=True, gamma=extra.get("gamma"),
                          epsilon=extra.get("epsilon"))
    from mergeflow.methods.passes import Program, run_whole

    def program(meta):
        return Program(lambda chunk, stats: sp.kept(prune, chunk, stats, sp.delta(chunk, 0)),
                       sp.passes([prune], meta.dtype), row_local=method == "della_magprune")
    whole = run_whole(program, [d], torch.zeros_like(d), {}, keys=(extra.get("key", 0),))
    for rows in (1, 7, 64):
        chunked = run_whole(program, [d], torch.zeros_like(d), {}, keys=(extra.get("key", 0),),
                            chunk_elements=rows * 48)
        assert torch.equal(chunked, whole), rows


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_random_masks_are_device_independent():
    d = torch.randn(64, 128)
    for method, extra in (("random", {}), ("della_magprune", {"epsilon": 0.1})):
        cpu = sp.sparsify(d, method, density=0.5, rescale=True, key=1, **extra)
        gpu = sp.sparsify(d.cuda(), method, density=0.5, rescale=True, key=1, **extra)
        assert torch.equal(cpu != 0, gpu.cpu() != 0)
