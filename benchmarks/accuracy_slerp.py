"""How close slerp's float32 outputs are to slerp in float64, for mergeflow and mergekit.

    python benchmarks/accuracy_slerp.py                 # a generated family, hidden 512
    python benchmarks/accuracy_slerp.py --hidden 1024

On tensors of more than 32,768 elements mergeflow's norms and cosine (exact sums of per-segment
float32 sums, methods/passes.py) and mergekit 0.1.5's (float32 sums over 1M-element chunks)
differ, so their float32 outputs differ (benchmarks/parity_mergekit.py --make-family). This
merges the same slerp with both tools in float32 (mergekit with one torch thread) and prints,
per tensor of over 32,768 elements and overall, each output's largest error relative to slerp
computed in float64 from the same inputs: which of the two is the more accurate.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file


def exact(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    dot = (a / a.norm() * (b / b.norm())).sum().clamp(-1, 1)
    if dot.abs() > 0.9995:
        return (1 - t) * a + t * b
    theta = torch.acos(dot)
    return (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--mergekit", default=os.environ.get("MERGEKIT_YAML", "/work/mkvenv/bin/mergekit-yaml"))
    args = parser.parse_args()
    from mergeflow.testing import make_family

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fam = make_family(root / "fam", seed=0, finetunes=["a"], noise=0.01, hidden=args.hidden,
                          intermediate=args.hidden * 9 // 2)
        cfg = root / "slerp.yml"
        cfg.write_text(f"merge_method: slerp\nbase_model: {fam['base']}\nmodels:\n  - model: {fam['a']}\n"
                       "parameters: {t: 0.5}\ndtype: float32\n")
        subprocess.run([sys.executable, "-m", "mergeflow.cli", "run", str(cfg), str(root / "mf"), "--quiet"], check=True)
        subprocess.run([args.mergekit, str(cfg), str(root / "mk"), "--allow-crimes"], check=True, capture_output=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
        base, other = load_file(fam["base"] / "model.safetensors"), load_file(fam["a"] / "model.safetensors")
        outs = {tool: load_file(root / tool / "model.safetensors") for tool in ("mf", "mk")}
        print("| tensor | elements | mergeflow max rel error | mergekit max rel error |")
        print("|---|---:|---:|---:|")
        worst = {"mf": 0.0, "mk": 0.0}
        for name in sorted(base, key=lambda k: -base[k].numel()):
            if base[name].numel() <= 32768 or not base[name].is_floating_point():
                continue
            ref = exact(base[name], other[name], 0.5)
            err = {tool: float((o[name].double().reshape(-1) - ref).abs().max() / ref.abs().max())
                   for tool, o in outs.items()}
            worst = {k: max(worst[k], v) for k, v in err.items()}
            print(f"| {name} | {base[name].numel():,} | {err['mf']:.2e} | {err['mk']:.2e} |")
        print(f"| worst | | {worst['mf']:.2e} | {worst['mk']:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
