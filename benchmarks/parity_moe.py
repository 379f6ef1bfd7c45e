"""Parity with mergekit-moe: the same MoE configs through mergekit-moe and `mergeflow moe`,
every tensor and config.json compared.

    python benchmarks/parity_moe.py                 # every case below
    python benchmarks/parity_moe.py mixtral-hidden qwen-hidden
    python benchmarks/parity_moe.py --keep out/     # keep both outputs of each case

mergekit-moe runs from its own environment (`--mergekit-moe`, default $MERGEKIT_MOE or
/work/mkvenv/bin/mergekit-moe), mergeflow on its default (distributed) scheduler. The cases
use the shipped example models (a Llama base and the instruct, code and math fine-tunes),
and, for Qwen3 MoE, a Qwen3 family built with mergeflow.testing in a temporary directory.

A row per case: the output architecture, the tensors of each tool, how many are identical
(names, dtypes, shapes and bytes), the largest distance in bfloat16 steps among the others,
whether config.json is the same text, and both tools' wall times. Random routers and noise
cannot match bit for bit (mergekit draws from one global generator), so those cases compare
the draws' statistics instead: the mean and standard deviation of the routers (`random`,
`uniform_random`) or of (noised weight - weight) / noise_scale, mergekit's and ours.
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

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples" / "models"
PROMPTS = {
    "instruct": (["Hello, how are you today?", "please help me write a letter"], []),
    "code": (["def merge(models, weights): return sum(models)", "import torch"], ["the lazy dog"]),
    "math": (["1 2 3 4 5 = 15", "x + y = z", "3.14159 2.71828"], []),
}
SHARED = ["the quick brown fox jumps over the lazy dog"]


def config(mode: str, family: Path = EX, dtype: str | None = "bfloat16", shared: str | None = None,
           extra: dict | None = None, architecture: str | None = None) -> str:
    """A mergekit-moe config of family/{base, instruct, code, math}; `shared`: none, `gated`
    (the base, with prompts) or `plain` (the base, no prompts)."""
    lines = [f"base_model: {family / 'base'}", f"gate_mode: {mode}"]
    lines += [f"dtype: {dtype}"] if dtype else []
    lines += [f"architecture: {architecture}"] if architecture else []
    lines.append("experts:")
    for name, (pos, neg) in PROMPTS.items():
        lines += [f"  - source_model: {family / name}", f"    positive_prompts: {json.dumps(pos)}"]
        lines += [f"    negative_prompts: {json.dumps(neg)}"] if neg else []
        lines += [f"    {k}: {v}" for k, v in (extra or {}).get(name, {}).items()]
    if shared:  # the base: mergekit-moe 0.1.5 fails on a shared expert that is no other input
        lines += ["shared_experts:", f"  - source_model: {family / 'base'}"]
        lines += [f"    positive_prompts: {json.dumps(SHARED)}"] if shared == "gated" else []
    return "\n".join(lines) + "\n"


CASES = {  # name -> (config text or a function of the Qwen3 family, what is random)
    "mixtral-cheap_embed": (lambda q3: config("cheap_embed"), None),
    "mixtral-hidden": (lambda q3: config("hidden"), None),
    "mixtral-hidden_avg": (lambda q3: config("hidden_avg"), None),
    "mixtral-float32-residual": (lambda q3: config("cheap_embed", dtype="float32",
                                                   extra={"code": {"residual_scale": 0.5}}), None),
    "mixtral-no-dtype": (lambda q3: config("hidden", dtype=None), None),
    "qwen-hidden-shared": (lambda q3: config("hidden", shared="gated", extra={"math": {"residual_scale": 0.8}}), None),
    "qwen-random-llama": (lambda q3: config("random", shared="plain", architecture="qwen"), "router"),
    "deepseek-cheap_embed": (lambda q3: config("cheap_embed", shared="plain"), None),
    "qwen3-hidden": (lambda q3: config("hidden", family=q3), None),
    "mixtral-random": (lambda q3: config("random"), "router"),
    "mixtral-uniform_random": (lambda q3: config("uniform_random"), "router"),
    "mixtral-noise": (lambda q3: config("cheap_embed", extra={"code": {"noise_scale": 0.01}}), "noise"),
}


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
    def ordered(x: torch.Tensor) -> torch.Tensor:
        i = x.to(torch.bfloat16).contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -32768 - i, i)
    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def compare(ours: dict, theirs: dict, random: str | None) -> dict:
    names = set(ours) & set(theirs)
    drawn = {n for n in names if random == "router" and n.endswith("gate.weight")}
    drawn |= {n for n in names if random == "noise" and ".mlp.experts." in n}
    exact = [n for n in names - drawn if same(ours[n], theirs[n])]
    differ = sorted(names - drawn - set(exact))
    row = {"ours": len(ours), "theirs": len(theirs), "identical": len(exact), "drawn": len(drawn),
           "differ": len(differ), "only": sorted(set(ours) ^ set(theirs))[:3],
           "ulps": max((ulps_bf16(ours[n].float(), theirs[n].float()) for n in differ
                        if ours[n].shape == theirs[n].shape), default=0)}
    if random == "router":
        row["stats"] = [_stats(torch.cat([d[n].float().flatten() for n in sorted(drawn)])) for d in (ours, theirs)]
    elif random == "noise":  # expert 1 (code) is noised; the other experts' slices are copies
        code = tensors(EX / "code")
        row["stats"] = [_stats(torch.cat([((d[n][1].float() - _dense(code, n).float()) / 0.01).flatten()
                                          for n in sorted(drawn)])) for d in (ours, theirs)]
        kept = sum(all(same(ours[n][e], theirs[n][e]) for e in (0, 2)) for n in drawn)
        row["stats"].append(f"experts 0 and 2 identical in {kept}/{len(drawn)}")
    return row


def _dense(expert: dict, fused: str) -> torch.Tensor:
    """The expert's dense weight(s) behind a fused Mixtral tensor (gate_up_proj: gate, then up)."""
    prefix = fused.removesuffix("experts.gate_up_proj").removesuffix("experts.down_proj")
    if fused.endswith("down_proj"):
        return expert[prefix + "down_proj.weight"]
    return torch.cat([expert[prefix + "gate_proj.weight"], expert[prefix + "up_proj.weight"]])


def _stats(x: torch.Tensor) -> str:
    return f"mean {x.mean():+.4f} std {x.std():.4f}"


def qwen3_family(work: Path) -> Path:
    from mergeflow import testing

    testing.FAMILIES.setdefault("qwen3", ("Qwen3Config", "Qwen3ForCausalLM"))
    testing.make_family(work / "qwen3", family="qwen3", seed=11, finetunes=list(PROMPTS))
    return work / "qwen3"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", help=f"cases to run (default all: {', '.join(CASES)})")
    parser.add_argument("--mergekit-moe", default=os.environ.get("MERGEKIT_MOE", "/work/mkvenv/bin/mergekit-moe"))
    parser.add_argument("--keep", type=Path, default=None, help="keep the outputs under this directory")
    args = parser.parse_args()
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        q3 = qwen3_family(work) if any(c.startswith("qwen3") for c in args.cases or CASES) else None
        print(f"{'case':26} {'architecture':22} {'ours':>4} {'mk':>4} {'same':>4} {'drawn':>5} {'differ':>6} "
              f"{'ulps':>4} {'config':>6} {'mk s':>5} {'mf s':>5}  statistics (ours | mergekit)")
        for name in args.cases or CASES:
            make, random = CASES[name]
            path = work / f"{name}.yml"
            path.write_text(make(q3))
            mk, mf = work / f"{name}-mergekit", work / f"{name}-mergeflow"
            mk_s = run([args.mergekit_moe, str(path), str(mk)])
            mf_s = run([sys.executable, "-m", "mergeflow.cli", "moe", str(path), str(mf), "--quiet", "--force",
                        "--dashboard-address", "127.0.0.1:0"])
            row = compare(tensors(mf), tensors(mk), random)
            arch = json.loads((mf / "config.json").read_text())["architectures"][0]
            config_same = (mf / "config.json").read_text() == (mk / "config.json").read_text()
            stats = " | ".join(row.get("stats", []))
            print(f"{name:26} {arch:22} {row['ours']:4} {row['theirs']:4} {row['identical']:4} {row['drawn']:5} "
                  f"{row['differ']:6} {row['ulps']:4} {'same' if config_same else 'DIFF':>6} {mk_s:5.1f} "
                  f"{mf_s:5.1f}  {stats}" + (f"  only in one: {row['only']}" if row["only"] else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
