"""Parity with mergekit-multi: run multi-stage chains through both, compare every stage's tensors.

    python benchmarks/parity_multi.py                    # every chain, bfloat16
    python benchmarks/parity_multi.py --dtype float32 ties-slerp-frankenmerge

Each chain (CHAINS, on the shipped examples/models) runs through `mergekit-multi -I DIR
--out-path OUT` (0.1.5, `--mergekit-multi`, one torch thread as parity_mergekit.py runs it)
and `mergeflow multi CONFIG OUT -I DIR`, and the output and every intermediate are compared
tensor by tensor, with parity_mergekit.py's measures and verdict. Chains with a top-k method
(ties) are also run through mergekit-multi with the index rule for elements tied at the cut
(benchmarks/mergekit_index_ties.py --multi); the verdict compares with that run and `tied`
counts the elements where plain mergekit-multi differs from it (METHODS.md, "Top-k").
A row per stage: `output` is the unnamed document.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parity_mergekit import INDEX_TIES, ROOT, _worst, compare, run, tensors, verdict  # noqa: E402

EX = ROOT / "examples" / "models"
CHAINS = {
    # the chain of issue 15: ties, then slerp with a third model, then a frankenmerge
    "ties-slerp-frankenmerge": """name: s1
merge_method: ties
base_model: {ex}/base
models:
  - model: {ex}/base
  - {{model: {ex}/instruct, parameters: {{weight: 0.6, density: 0.5}}}}
  - {{model: {ex}/math, parameters: {{weight: 0.4, density: 0.5}}}}
dtype: {dtype}
---
name: s2
merge_method: slerp
base_model: s1
models:
  - model: s1
  - model: {ex}/code
parameters:
  t: [{{filter: self_attn, value: [0.0, 0.5, 1.0]}}, {{value: 0.3}}]
dtype: {dtype}
---
merge_method: passthrough
slices:
  - sources: [{{model: s2, layer_range: [0, 3]}}]
  - sources: [{{model: s2, layer_range: [1, 4]}}]
dtype: {dtype}
""",
    # no top-k anywhere: every tensor must be identical; the output reads both earlier stages
    "task_arithmetic-linear-frankenmerge": """name: ta
merge_method: task_arithmetic
base_model: {ex}/base
models:
  - {{model: {ex}/instruct, parameters: {{weight: 0.7}}}}
  - {{model: {ex}/code, parameters: {{weight: [0.2, 0.5]}}}}
dtype: {dtype}
---
name: lin
merge_method: linear
models:
  - {{model: ta, parameters: {{weight: 0.5}}}}
  - {{model: {ex}/math, parameters: {{weight: 0.5}}}}
dtype: {dtype}
---
merge_method: passthrough
slices:
  - sources: [{{model: ta, layer_range: [0, 2]}}]
  - sources:
      - model: lin
        layer_range: [1, 4]
        parameters:
          scale: [{{filter: o_proj, value: 0.5}}, {{value: 1.0}}]
dtype: {dtype}
""",
}
TOPK = ("merge_method: ties", "merge_method: breadcrumbs", "merge_method: sce")


def parity(name: str, args, work: Path) -> list[tuple[str, dict]]:
    text = CHAINS[name].format(ex=EX, dtype=args.dtype)
    config = work / f"{name}.yml"
    config.write_text(text)
    mk, mf = work / f"mk-{name}", work / f"mf-{name}"
    run([args.mergekit_multi, str(config), "-I", str(mk / "inter"), "--out-path", str(mk / "out")], args.mk_threads)
    run([sys.executable, "-m", "mergeflow.cli", "multi", str(config), str(mf / "out"), "-I", str(mf / "inter"),
         "--quiet", "--scheduler", "threads"])
    index = None
    if any(m in text for m in TOPK):
        index = work / f"mki-{name}"
        run([str(Path(args.mergekit_multi).with_name("python")), str(INDEX_TIES), "--multi", str(config),
             "-I", str(index / "inter"), "--out-path", str(index / "out")], args.mk_threads)
    stages = sorted(p.name for p in (mf / "inter").iterdir())
    rows = []
    for stage, sub in [(s, f"inter/{s}") for s in stages] + [("output", "out")]:
        ours, plain = tensors(mf / sub), tensors(mk / sub)
        theirs = tensors(index / sub) if index is not None else plain
        if set(ours) != set(theirs):
            raise RuntimeError(f"{name} {stage}: tensor names differ: only ours {sorted(set(ours) - set(theirs))[:3]}, "
                               f"only mergekit's {sorted(set(theirs) - set(ours))[:3]}")
        found = [compare(ours[k], theirs[k]) for k in sorted(ours)]
        worst = _worst(found)
        worst["tensors"] = len(found)
        if index is not None:
            worst["tied"] = sum(int((plain[k] != theirs[k]).sum()) for k in plain)
        rows.append((stage, worst))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("chains", nargs="*", help=f"chains to check (default all: {', '.join(CHAINS)})")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--mergekit-multi", default="/work/mkvenv/bin/mergekit-multi")
    parser.add_argument("--mk-threads", type=int, default=1, help="torch threads for mergekit (OMP_NUM_THREADS)")
    args = parser.parse_args()
    if not Path(args.mergekit_multi).exists():
        print(f"mergekit-multi not found at {args.mergekit_multi}; pass --mergekit-multi", file=sys.stderr)
        return 2
    print(f"{'chain':38} {'stage':8} {'tensors':>7} verdict  worst over tensors (dtype {args.dtype})")
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.chains or CHAINS:
            for stage, worst in parity(name, args, Path(tmp)):
                mark = verdict(worst)
                failed += mark != "PASS"
                tied = f" tied={worst.pop('tied')} (plain mergekit-multi vs ties by index, carried into later stages)" if "tied" in worst else ""
                n = worst.pop("tensors")
                print(f"{name:38} {stage:8} {n:7d} {mark:8} "
                      + " ".join(f"{k}={v:.3g}" for k, v in worst.items()) + tied, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
