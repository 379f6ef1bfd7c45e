"""The LoRA kernel: truncated SVD factors, their rank, their error, and thread independence."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from mergeflow.exec.lowrank import decompose, rank_for, relative_error


def matrix(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.01


def test_a_diagonal_matrix_by_hand():
    # singular values 3, 2, 1 (rows and columns permuted): rank 1 keeps the 3 alone
    d = torch.tensor([[0.0, 0.0, 1.0], [3.0, 0.0, 0.0], [0.0, -2.0, 0.0]])
    a, b, s = decompose(d, 1)
    assert s.tolist() == [3.0, 2.0, 1.0]
    root = math.sqrt(3)
    close(a.abs(), [[root, 0, 0]])  # sqrt(3) e1, up to sign
    close(b.abs(), [[0], [root], [0]])
    close(b @ a, [[0, 0, 0], [3, 0, 0], [0, 0, 0]])
    assert relative_error(d, a, b) == pytest.approx(math.sqrt(5 / 14))
    a, b, _ = decompose(d, 1, distribute_scale=False)  # S goes into A, B is U
    close(a.abs(), [[3, 0, 0]])
    close(b.abs(), [[0], [1], [0]])


def close(t: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(t, torch.tensor(expected, dtype=t.dtype))


@pytest.mark.parametrize("shape", [(24, 10), (10, 24)])
def test_full_rank_reproduces_the_matrix(shape):
    d = matrix(*shape)
    a, b, _ = decompose(d, min(shape))
    assert a.shape == (min(shape), shape[1]) and b.shape == (shape[0], min(shape))
    torch.testing.assert_close(b @ a, d, rtol=0, atol=1e-7)
    assert relative_error(d, a, b) < 1e-6


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_rank_r_is_the_best_rank_r_approximation(rank):
    """Eckart-Young: the Frobenius error of the best rank-r approximation is the norm of the
    dropped singular values, its spectral error the largest dropped one (numpy, float64)."""
    d = matrix(30, 17, seed=rank)
    s = np.linalg.svd(d.double().numpy(), compute_uv=False)
    a, b, _ = decompose(d, rank)
    rest = (d - b @ a).double().numpy()
    assert np.linalg.norm(rest) == pytest.approx(np.sqrt((s[rank:] ** 2).sum()), rel=1e-5)
    assert np.linalg.norm(rest, 2) == pytest.approx(s[rank], rel=1e-5)
    assert relative_error(d, a, b) == pytest.approx(np.sqrt((s[rank:] ** 2).sum() / (s ** 2).sum()), rel=1e-5)


def test_rank_for_keeps_values_above_epsilon_up_to_the_cap():
    s = torch.tensor([5.0, 1.0, 0.5, 0.1])
    assert rank_for(s, 3, 0.0) == 3
    assert rank_for(s, 3, 0.5) == 2  # 0.5 itself is dropped, as in mergekit (s > epsilon)
    assert rank_for(s, 9, 0.05) == 4
    assert rank_for(s, 3, 10.0) == 0
    assert relative_error(torch.zeros(3, 3), torch.zeros(1, 3), torch.zeros(3, 1)) == 0.0


def test_the_factors_do_not_depend_on_the_callers_thread_count():
    """MKL's SVD differs in the last bits between 1 and 2 threads; the kernel runs it on one
    thread of its own, and gives the caller's thread count back."""
    d = matrix(384, 256, seed=3)
    results, seen = {}, {}

    def run(threads: int) -> None:
        torch.set_num_threads(threads)
        results[threads] = decompose(d, 32)
        seen[threads] = torch.get_num_threads()

    for threads in (1, 2):
        worker = threading.Thread(target=run, args=(threads,))
        worker.start()
        worker.join()
    for x, y in zip(results[1], results[2]):
        assert torch.equal(x, y)
    assert seen == {1: 1, 2: 2}
