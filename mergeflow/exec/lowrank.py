"""The LoRA kernel: a weight's change as two factors, by truncated SVD (pure torch).

delta = U S Vh (torch.linalg.svd, float32, exact); the rank-r LoRA is A = sqrt(S_r) Vh_r and
B = U_r sqrt(S_r) (or A = S_r Vh_r, B = U_r without distribute_scale), so B @ A is the best
rank-r approximation of delta in the Frobenius and spectral norms (Eckart-Young). A randomized
SVD (torch.svd_lowrank, q = r + 10) is 7-22x faster at rank 128 on 1024-2048-wide matrices but
its error is 0.9-2.3% above the optimum with 2 power iterations (0.2-0.9% with 4), on flat and
slowly decaying spectra like fine-tunes' (benchmarks/bench_lowrank.py), so the exact SVD is
used, as mergekit uses it.

LAPACK's SVD (MKL) gives different bits with different thread counts, so on the CPU each
decomposition runs on one thread of its calling thread (torch's thread count is per thread),
whatever the scheduler: the same factors on sync, threads or distributed workers. Parallelism
comes from decomposing several weights at once.
"""

from __future__ import annotations

import contextlib

import torch

SVD_THREADS = 1


@contextlib.contextmanager
def pinned_threads(device: torch.device):
    """This thread's torch (OpenMP, MKL) threads set to SVD_THREADS for the block (CPU only)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(SVD_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rank_for(s: torch.Tensor, cap: int, sv_epsilon: float) -> int:
    """The rank kept: at most `cap`, and with sv_epsilon > 0 only singular values above it."""
    rank = min(cap, s.shape[0])
    if sv_epsilon > 0:
        rank = min(rank, int((s > sv_epsilon).sum()))
    return rank


def decompose(delta: torch.Tensor, rank: int, distribute_scale: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, singular values) of a float32 matrix: B @ A is its best rank-`rank` approximation."""
    with pinned_threads(delta.device):
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    kept = s[:rank]
    if distribute_scale:
        root = kept.sqrt()
        return vh[:rank] * root[:, None], u[:, :rank] * root[None, :], s
    return vh[:rank] * kept[:, None], u[:, :rank].clone(), s


def relative_error(delta: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """||delta - B @ A||_F / ||delta||_F in float32 (0 for a zero delta)."""
    norm = float(torch.linalg.matrix_norm(delta))
    if norm == 0.0:
        return 0.0
    return float(torch.linalg.matrix_norm(delta - b.float() @ a.float())) / norm
