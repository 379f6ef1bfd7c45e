"""Exact or randomized SVD for LoRA extraction: time and error at rank r, one thread each.

    python benchmarks/bench_lowrank.py                  # rank 128, three shapes, three spectra
    python benchmarks/bench_lowrank.py --rank 64 --shapes 4096x4096

For each shape and kind of change D, on one torch thread (as each extraction task runs):
`svd` (torch.linalg.svd, what mergeflow uses), `svdvals` (the singular values alone: the extra
pass --sv-epsilon costs), and `lowrank q=r+10 niter=k` (torch.svd_lowrank, randomized). The
error column is the relative excess of ||D - D_r||_F over the optimum sqrt(sum of the dropped
s_i^2) (Eckart-Young): 0 for the exact SVD. Kinds of D:
- `noise`: i.i.d. gaussian (a flat spectrum: the tiny example models' fine-tunes);
- `power`: singular values i^-0.5 with random singular vectors (a slowly decaying spectrum,
  as fine-tune deltas have);
- `lowrank+noise`: a rank-32 change plus 1% noise (what LoRA fine-tunes look like).
"""

from __future__ import annotations

import argparse
import time

import torch


def change(kind: str, rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    k = min(rows, cols)
    if kind == "noise":
        return torch.randn(rows, cols, generator=gen)
    if kind == "power":
        u, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen))
        v, _ = torch.linalg.qr(torch.randn(cols, k, generator=gen))
        return (u * torch.arange(1, k + 1, dtype=torch.float32) ** -0.5) @ v.T
    low = torch.randn(rows, 32, generator=gen) @ torch.randn(32, cols, generator=gen) / 32 ** 0.5
    return low + 0.01 * low.std() * torch.randn(rows, cols, generator=gen)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def measure(d: torch.Tensor, r: int) -> list[tuple[str, float, float]]:
    """(method, seconds, excess error) of each way to the rank-r approximation of d."""
    (u, s, vh), t_svd = timed(torch.linalg.svd, d, full_matrices=False)
    best = float(s.double()[r:].square().sum().sqrt())
    _, t_vals = timed(torch.linalg.svdvals, d)

    def excess(approx: torch.Tensor) -> float:
        return float((d.double() - approx.double()).norm()) / best - 1 if best else 0.0

    out = [("svd (exact)", t_svd, excess((u[:, :r] * s[:r]) @ vh[:r])), ("svdvals", t_vals, float("nan"))]
    for niter in (2, 4):
        torch.manual_seed(0)
        (lu, ls, lv), t = timed(torch.svd_lowrank, d, q=r + 10, niter=niter)
        out.append((f"lowrank q=r+10 niter={niter}", t, excess((lu[:, :r] * ls[:r]) @ lv[:, :r].T)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--shapes", nargs="*", default=["1024x1024", "1024x2816", "2048x2048"])
    parser.add_argument("--kinds", nargs="*", default=["noise", "power", "lowrank+noise"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'shape':>10} {'kind':>14} {'method':>24} {'seconds':>8} {'excess error':>13}")
    for shape in args.shapes:
        rows, cols = (int(x) for x in shape.split("x"))
        for kind in args.kinds:
            d = change(kind, rows, cols, torch.Generator().manual_seed(0))
            for method, seconds, err in measure(d, args.rank):
                print(f"{shape:>10} {kind:>14} {method:>24} {seconds:8.2f} {err:13.2e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
