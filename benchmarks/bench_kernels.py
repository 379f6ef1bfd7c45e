"""Time each method's passes on one tensor held in memory, on one core: where its CPU time goes.

    python benchmarks/bench_kernels.py                      # 5632 x 2048 bfloat16 (an MLP weight)
    python benchmarks/bench_kernels.py --shape 4096 4096 --repeat 5 ties dare_ties

Builds a base tensor and two fine-tunes (base + small noise, like the benchmark family), sets
torch to one thread (each merge task gets one core) and runs every method's program over the
tensor in the engine's chunks (exec/budget.py CHUNK_ELEMENTS), without reading or writing
files, keeping what passes keep per chunk (as a resident tensor's task does). Prints a markdown table: per method and step (each reduction pass, then the apply), the
fastest of --repeat runs and the time per element of the tensor. Run with `mergeflow`'s
settings: THP_MEM_ALLOC_ENABLE=1 and the glibc thresholds of `mergeflow run` are set here too.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before torch loads, as the CLI does

METHODS = ("linear", "ties", "dare_ties", "della", "breadcrumbs", "slerp", "model_stock", "sce", "arcee_fusion")
PARAMS = {
    "linear": {"weight": [0.4, 0.3, 0.3]},
    "slerp": {"t": 0.5},
    "sce": {"select_topk": 0.5},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("methods", nargs="*", default=list(METHODS))
    parser.add_argument("--shape", type=int, nargs=2, default=[5632, 2048], help="rows columns")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each step (default 3)")
    args = parser.parse_args()
    from mergeflow.cli.process import _return_freed_memory

    _return_freed_memory()  # glibc's thresholds, as `mergeflow run` sets them

    import torch

    from mergeflow.exec.budget import CHUNK_ELEMENTS
    from mergeflow.methods import REGISTRY
    from mergeflow.methods.draws import stream_keys
    from mergeflow.methods.passes import Layout, Meta, apply_rows, reduce_pass

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    shape = tuple(args.shape)
    n = shape[0] * shape[1]
    base = (torch.randn(shape, generator=g) * 0.02).bfloat16()
    fts = [(base.float() + torch.randn(shape, generator=g) * 0.002).bfloat16() for _ in range(2)]
    layout = Layout(shape)
    print(f"| method | step | fastest s | ns / element |  ({shape[0]} x {shape[1]} bf16, {n / 1e6:.1f}M elements, "
          f"chunks of {CHUNK_ELEMENTS} elements, 1 thread)")
    print("|---|---|---:|---:|")
    for name in args.methods:
        m = REGISTRY[name]
        xs, b = ([base, *fts], None) if m.base == "input" else ((fts[:1] if m.max_inputs == 1 else fts), base)
        params = dict(m.preset)
        for p in m.params:
            params[p.name] = [p.default] * len(xs) if p.per_model and not p.required else p.default
        params |= PARAMS.get(name, {"weight": [0.5] * len(xs), "density": [0.5] * len(xs)})
        program = m.program(Meta(shape, torch.bfloat16, len(xs), b is not None, params))
        keys = stream_keys(0, "t", len(xs)) if m.random else ()

        def source(a: int, c: int, xs=xs, b=b):
            return [x[a:c] for x in xs], (b[a:c] if b is not None else None)

        stats: dict = {}
        memo: dict = {}  # what passes keep per chunk, as a resident tensor's task keeps it
        steps = [(f"pass {k + 1}", k) for k in range(len(program.passes))] + [("apply", None)]
        total = 0.0
        for label, k in steps:
            best = float("inf")
            for _ in range(args.repeat):
                started = time.perf_counter()
                if k is None:
                    apply_rows(program, source, layout, stats, (0, shape[0]), CHUNK_ELEMENTS, lambda *a: None, keys,
                               memo=memo)
                elif not program.passes[k].skip(stats):
                    memo.clear()
                    part = reduce_pass(program, k, source, layout, stats, (0, shape[0]), CHUNK_ELEMENTS, keys, memo=memo)
                    new = program.passes[k].finish([part], stats)
                best = min(best, time.perf_counter() - started)
            if k is not None and not program.passes[k].skip(stats):
                stats |= new
            total += best
            print(f"| {name} | {label} | {best:.3f} | {best / n * 1e9:.1f} |")
        print(f"| {name} | total | {total:.3f} | {total / n * 1e9:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
