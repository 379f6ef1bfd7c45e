"""Parity with mergekit: run the same config through mergekit and mergeflow, compare tensors.

    python benchmarks/parity_mergekit.py                       # every configs/<method>.yml
    python benchmarks/parity_mergekit.py --dtype float32 ties slerp
    python benchmarks/parity_mergekit.py --config my.yml --per-tensor

mergekit runs from its own environment (`--mergekit`, default $MERGEKIT_YAML or
/work/mkvenv/bin/mergekit-yaml). Each config's `dtype`/`out_dtype` are replaced by
`--dtype`. Deterministic methods print the largest absolute and relative difference, the
share of elements that differ, and (bfloat16) the largest distance in ulps. Random methods
(dare_*, della*) cannot match bit for bit (mergekit uses one global generator), so they
print the relative difference of the kept fraction and of the L1 norm of each task vector.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def run(cmd: list[str]) -> float:
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.monotonic() - start


def ulps_bf16(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in bfloat16 steps (ordered integer view of the bit patterns)."""
    def ordered(x: torch.Tensor) -> torch.Tensor:
        i = x.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -32768 - i, i)
    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0


def compare(ours: torch.Tensor, theirs: torch.Tensor) -> dict[str, float]:
    a, b = ours.float(), theirs.float()
    diff = (a - b).abs()
    scale = b.abs().max().clamp_min(1e-12)
    row = {"max_abs": float(diff.max()), "max_rel": float(diff.max() / scale),
           "differ": float((diff > 0).float().mean())}
    if ours.dtype == torch.bfloat16:
        row["ulps"] = ulps_bf16(ours, theirs)
    return row


def compare_random(ours: torch.Tensor, theirs: torch.Tensor, base: torch.Tensor | None) -> dict[str, float]:
    ref = base.float() if base is not None else torch.zeros_like(ours, dtype=torch.float32)
    da, db = ours.float() - ref, theirs.float() - ref
    kept_a, kept_b = float((da != 0).float().mean()), float((db != 0).float().mean())
    l1_a, l1_b = float(da.abs().sum()), float(db.abs().sum())
    return {"kept_rel": abs(kept_a - kept_b) / max(kept_b, 1e-12),
            "l1_rel": abs(l1_a - l1_b) / max(l1_b, 1e-12)}


def prepare(config: Path, dtype: str, work: Path) -> Path:
    data = yaml.safe_load(config.read_text())
    data["dtype"] = dtype
    data.pop("out_dtype", None)
    out = work / config.name
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def parity(config: Path, args, work: Path) -> list[tuple[str, dict]]:
    cfg = prepare(config, args.dtype, work)
    method = yaml.safe_load(cfg.read_text())["merge_method"]
    mk_out, mf_out = work / f"mk-{config.stem}", work / f"mf-{config.stem}"
    t_mk = run([args.mergekit, str(cfg), str(mk_out), "--allow-crimes"])
    t_mf = run([sys.executable, "-m", "mergeflow.cli", "run", str(cfg), str(mf_out), "--force",
                "--quiet", "--scheduler", "threads"])
    ours, theirs = tensors(mf_out), tensors(mk_out)
    if set(ours) != set(theirs):
        raise RuntimeError(f"{config.name}: tensor names differ: only ours {sorted(set(ours) - set(theirs))[:3]}, "
                           f"only mergekit's {sorted(set(theirs) - set(ours))[:3]}")
    base = None
    if method in RANDOM:
        base_dir = ROOT / yaml.safe_load(cfg.read_text())["base_model"]
        base = tensors(base_dir)
    rows = []
    for name in sorted(ours):
        if method in RANDOM:
            rows.append((name, compare_random(ours[name], theirs[name], base.get(name))))
        else:
            rows.append((name, compare(ours[name], theirs[name])))
    print(f"# {config.name}: mergekit {t_mk:.1f} s, mergeflow {t_mf:.1f} s", file=sys.stderr)
    return rows


def summarize(method: str, rows: list[tuple[str, dict]], per_tensor: bool) -> str:
    keys = list(rows[0][1])
    if per_tensor:
        return "\n".join(f"{method:18} {name:55} " + " ".join(f"{k}={v:.3g}" for k, v in r.items())
                         for name, r in rows)
    worst = {k: max(r[k] for _, r in rows) for k in keys}
    return f"{method:18} {len(rows):5d} " + " ".join(f"{k}={v:.3g}" for k, v in worst.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("methods", nargs="*", help="methods to check (configs/<method>.yml); default all")
    parser.add_argument("--config", type=Path, action="append", help="a config to check instead")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--mergekit", default=os.environ.get("MERGEKIT_YAML", "/work/mkvenv/bin/mergekit-yaml"))
    parser.add_argument("--per-tensor", action="store_true", help="one line per tensor")
    args = parser.parse_args()
    if not Path(args.mergekit).exists():
        print(f"mergekit-yaml not found at {args.mergekit}; install mergekit==0.1.5 in a separate venv "
              "and pass --mergekit", file=sys.stderr)
        return 2
    from mergeflow.methods import REGISTRY

    configs = args.config or [ROOT / "configs" / f"{m}.yml" for m in (args.methods or REGISTRY)]
    print(f"{'method':18} {'tensors':>5} worst over tensors (dtype {args.dtype})")
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs:
            try:
                rows = parity(config, args, Path(tmp))
            except RuntimeError as e:
                print(f"{config.stem:18} FAILED: {str(e)[-400:]}")
                continue
            print(summarize(config.stem, rows, args.per_tensor), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
