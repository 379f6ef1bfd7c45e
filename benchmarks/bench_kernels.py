"""Time the merge kernels on one tensor, on one core: where a method's CPU time goes.

    python benchmarks/bench_kernels.py                  # 5632 x 2048 bfloat16 (an MLP weight)
    python benchmarks/bench_kernels.py --shape 4096 4096 --repeat 9

Builds a base tensor and two fine-tunes (base + small noise, like the benchmark family), sets
torch to one thread (each merge task gets one core) and prints a markdown table: the fastest
and the median of --repeat runs of each step. The rows compare the ways a step can be done
where mergeflow chose one: torch.argsort of |delta| as float32 (mergekit's) against the
float32 bits read as int32 (mergeflow's; the table says whether the permutations are equal),
and linear on the whole tensor against row chunks (as tasks.stream runs it, without the
reads and writes; memory.CHUNK_ELEMENTS). Run it through `mergeflow`'s
settings: THP_MEM_ALLOC_ENABLE=1 and the glibc thresholds of `mergeflow run` are set here too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before torch loads, as the CLI does


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=2, default=[5632, 2048], help="rows columns")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each step (default 5)")
    args = parser.parse_args()
    from mergeflow.cli import _return_freed_memory

    _return_freed_memory()  # glibc's thresholds, as `mergeflow run` sets them

    import torch

    from mergeflow.exec.budget import CHUNK_ELEMENTS
    from mergeflow.methods import REGISTRY
    from mergeflow.methods import sparsify as sp
    from mergeflow.methods.task_arithmetic import _mix

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    shape = tuple(args.shape)
    base = (torch.randn(shape, generator=g) * 0.02).bfloat16()
    xs = [(base.float() + torch.randn(shape, generator=g) * 0.002).bfloat16() for _ in range(2)]
    d = xs[0] - base
    w = d.abs().reshape(-1).float()
    terms = [(x - base) * torch.tensor(0.5, dtype=torch.bfloat16) for x in xs]
    weights = [torch.tensor(0.5, dtype=torch.bfloat16)] * 2
    ties, dare = REGISTRY["ties"], REGISTRY["dare_ties"]
    linear, rows = REGISTRY["linear"].kernel, max(1, CHUNK_ELEMENTS // shape[1])

    def whole_linear():
        return linear([*xs, base], None, weight=[0.4, 0.3, 0.3], normalize=True)

    def chunked_linear():
        out = torch.empty(shape, dtype=torch.bfloat16)
        for r in range(0, shape[0], rows):
            out[r:r + rows] = linear([x[r:r + rows] for x in (*xs, base)], None, weight=[0.4, 0.3, 0.3],
                                     normalize=True)
        return out

    steps = [
        ("argsort abs(d) as float32, descending (mergekit)", lambda: torch.argsort(w, descending=True)),
        ("argsort abs(d) float32 bits as int32, descending", lambda: torch.argsort(w.view(torch.int32), descending=True)),
        ("magnitude sparsifier, density 0.5", lambda: sp.magnitude(d, 0.5)),
        ("random sparsifier + L1 rescale, density 0.5",
         lambda: sp.random(d, 0.5, generator=torch.Generator().manual_seed(1), rescale=True)),
        ("TIES mix of 2 (consensus, normalize)", lambda: _mix(terms, weights, True, True)),
        ("TIES mix of 2 (consensus, no normalize)", lambda: _mix(terms, weights, True, False)),
        ("ties kernel, 2 models", lambda: ties.kernel(xs, base, weight=[0.5, 0.5], density=[0.5, 0.5],
                                                      normalize=True, **ties.preset)),
        ("dare_ties kernel, 2 models", lambda: dare.kernel(
            xs, base, weight=[0.5, 0.5], density=[0.5, 0.5], rescale=True, **dare.preset,
            generators=[torch.Generator().manual_seed(i) for i in range(2)])),
        ("linear of 3, whole tensor", whole_linear),
        (f"linear of 3, row chunks of {CHUNK_ELEMENTS} elements", chunked_linear),
    ]
    same = torch.equal(torch.argsort(w, descending=True), torch.argsort(w.view(torch.int32), descending=True))
    print(f"`python benchmarks/bench_kernels.py --shape {shape[0]} {shape[1]} --repeat {args.repeat}`\n")
    print(f"one {shape[0]} x {shape[1]} bfloat16 tensor ({base.numel():,} elements), 1 torch thread, "
          f"torch {torch.__version__}; int32-key argsort gives the same permutation: {same}\n")
    print("| step | fastest ms | median ms |\n|---|---:|---:|")
    for label, step in steps:
        step()  # warm-up: allocator, lazy initialisation
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            step()
            times.append((time.perf_counter() - started) * 1000)
        print(f"| {label} | {min(times):.1f} | {statistics.median(times):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
