"""Parity with mergekit-extract-lora: the same fine-tune and base through both tools, adapters compared.

    python benchmarks/parity_extract_lora.py                    # examples/models, every case
    python benchmarks/parity_extract_lora.py --family DIR r8    # DIR/{base,instruct,code,math}

mergekit runs from its own environment (`--mergekit`, default $MERGEKIT_EXTRACT_LORA or
/work/mkvenv/bin/mergekit-extract-lora) with one torch thread (`-j 1`), as each mergeflow SVD
runs. A and B are only defined up to the signs (and, for equal singular values, rotations) of
the singular vectors, so the adapters are compared through what they mean:

- `names`: the same tensor names and shapes in both files (so the same ranks);
- `config`: adapter_config.json keys that differ (besides the order of target_modules);
- `copied`: modules_to_save tensors byte-identical / all of them;
- `BA_diff`: the largest ||B A (mergeflow) - B A (mergekit)||_F / ||B A (mergekit)||_F over modules;
- `best`: the largest relative error ||D - D_r||_F / ||D||_F of the best rank-r approximation
  D_r of the exact float32 change D (numpy float64 SVD), over modules;
- `ex_mf`, `ex_mk`: the largest excess of each tool's relative error ||D - B A||_F / ||D||_F over
  that optimum (0: optimal; what is left is the rounding of A and B to the models' dtype, and
  for mergekit its subtraction in that dtype);
- `kernel`: mergeflow's kernel (mergeflow.exec.lowrank.decompose) fed mergekit's own
  difference (the subtraction in the models' dtype, mergekit's TaskVectorTask) gives A and B
  byte-identical to mergekit's: modules identical / all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
P = "base_model.model."
CASES = {
    "r8": ["--max-rank", "8"],
    "full": ["--max-rank", "128"],
    "eps": ["--sv-epsilon", "0.1"],
    "embed": ["--embed-lora", "--max-rank", "16"],
    "nodist": ["--no-distribute-scale", "--max-rank", "8"],
    "attn": ["-i", "self_attn", "--skip-undecomposable", "--max-rank", "8"],
}


def run(cmd: list[str]) -> float:
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.monotonic() - start


def modules(adapter: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor, bool]]:
    """module -> (A, B, embedding) of every LoRA in an adapter file."""
    out = {}
    for name, a in adapter.items():
        for a_key, b_key, emb in ((".lora_A.weight", ".lora_B.weight", False),
                                  (".lora_embedding_A", ".lora_embedding_B", True)):
            if name.endswith(a_key):
                module = name[len(P):-len(a_key)]
                out[module] = (a, adapter[name[:-len(a_key)] + b_key], emb)
    return out


def compare(ft: Path, base: Path, ours: Path, theirs: Path, distribute: bool) -> dict[str, str]:
    from mergeflow.exec.lowrank import decompose

    mf, mk = load_file(ours / "adapter_model.safetensors"), load_file(theirs / "adapter_model.safetensors")
    tuned, based = load_file(ft / "model.safetensors"), load_file(base / "model.safetensors")
    c_mf = json.loads((ours / "adapter_config.json").read_text())
    c_mk = json.loads((theirs / "adapter_config.json").read_text())
    config = sorted(k for k in set(c_mf) | set(c_mk) if k != "target_modules" and c_mf.get(k) != c_mk.get(k))
    if sorted(c_mf.get("target_modules", [])) != sorted(c_mk.get("target_modules", [])):
        config.append("target_modules")
    same_names = {k: tuple(v.shape) for k, v in mf.items()} == {k: tuple(v.shape) for k, v in mk.items()}
    copies = [k for k in mk if "lora_" not in k]
    copied = sum(k in mf and torch.equal(mf[k], mk[k]) for k in copies)
    ba_diff, best_rel, ex_mf, ex_mk, kernel = 0.0, 0.0, 0.0, 0.0, 0
    lora_mf, lora_mk = modules(mf), modules(mk)
    for module, (a_k, b_k, emb) in lora_mk.items():
        weight = module + ".weight"
        exact = tuned[weight].float() - based[weight].float()
        theirs_delta = (tuned[weight] - based[weight]).float()  # mergekit: in the models' dtype
        if emb:
            exact, theirs_delta = exact.T, theirs_delta.T
        rank = a_k.shape[0]
        s = np.linalg.svd(exact.double().numpy(), compute_uv=False)
        norm = float(np.linalg.norm(s))
        best = float(np.sqrt((s[rank:] ** 2).sum())) / norm
        a_m, b_m, _ = lora_mf[module]
        prod_mf, prod_mk = b_m.float() @ a_m.float(), b_k.float() @ a_k.float()
        ba_diff = max(ba_diff, float((prod_mf - prod_mk).norm() / prod_mk.norm()))
        best_rel = max(best_rel, best)
        ex_mf = max(ex_mf, float((exact - prod_mf).norm()) / norm - best)
        ex_mk = max(ex_mk, float((exact - prod_mk).norm()) / norm - best)
        a, b, _ = decompose(theirs_delta, rank, distribute)
        kernel += torch.equal(a.to(a_k.dtype), a_k) and torch.equal(b.to(b_k.dtype), b_k)
    return {"names": "same" if same_names else "DIFFER", "config": ",".join(config) or "-",
            "copied": f"{copied}/{len(copies)}", "BA_diff": f"{ba_diff:.2e}",
            "best": f"{best_rel:.3e}", "ex_mf": f"{ex_mf:.2e}", "ex_mk": f"{ex_mk:.2e}",
            "kernel": f"{kernel}/{len(lora_mk)}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=list(CASES), help=f"of {', '.join(CASES)}")
    parser.add_argument("--family", default=str(ROOT / "examples" / "models"))
    parser.add_argument("--finetunes", nargs="*", default=["instruct", "code", "math"])
    parser.add_argument("--mergekit", default=os.environ.get("MERGEKIT_EXTRACT_LORA",
                                                             "/work/mkvenv/bin/mergekit-extract-lora"))
    args = parser.parse_args()
    family = Path(args.family)
    header = ["case", "model", "names", "config", "copied", "BA_diff", "best", "ex_mf", "ex_mk", "kernel",
              "mf_s", "mk_s"]
    print(" | ".join(header))
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            for ft_name in args.finetunes:
                ft, base = family / ft_name, family / "base"
                ours, theirs = Path(tmp) / f"{case}-{ft_name}-mf", Path(tmp) / f"{case}-{ft_name}-mk"
                common = ["--model", str(ft), "--base-model", str(base)]
                mf_s = run([sys.executable, "-m", "mergeflow.cli", "extract-lora", *common, "--out-path",
                            str(ours), "--quiet", "--scheduler", "sync", *CASES[case]])
                mk_s = run([args.mergekit, *common, "--out-path", str(theirs), "-j", "1", *CASES[case]])
                row = compare(ft, base, ours, theirs, "--no-distribute-scale" not in CASES[case])
                print(" | ".join([case, ft_name, *row.values(), f"{mf_s:.1f}", f"{mk_s:.1f}"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
