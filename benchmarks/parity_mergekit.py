"""Parity with mergekit: run the same config through mergekit and mergeflow, compare tensors.

    python benchmarks/parity_mergekit.py                       # every configs/<method>.yml
    python benchmarks/parity_mergekit.py --dtype float32 ties slerp
    python benchmarks/parity_mergekit.py --config my.yml --per-tensor
    python benchmarks/parity_mergekit.py --make-family 256 dare_ties della   # bigger models
    python benchmarks/parity_mergekit.py --corpus              # configs/corpus/, modules: included

mergekit runs from its own environment (`--mergekit`, default $MERGEKIT_YAML or
/work/mkvenv/bin/mergekit-yaml). Each config's `dtype`/`out_dtype` are replaced by
`--dtype` (`none`: removed). `--family DIR` runs the configs on DIR/{base,instruct,code,math}
instead of examples/models; `--make-family HIDDEN` first builds such a family
(mergeflow.testing) with that hidden size in a temporary directory. `--corpus` runs the
mergekit-style configs of configs/corpus/ as written (their own dtypes unless `--dtype`; those
both tools refuse, `expect-exit: 2`, left out), with `VLM/` standing for a tiny
vision-language family built in a temporary directory (mergeflow.testing.make_vlm_family). mergekit runs with one
torch thread (`--mk-threads`), as each mergeflow task does, so float32 reductions over large
tensors sum in the same order.

Deterministic methods print the largest absolute difference, the largest relative one
(|ours - theirs| over the tensor's largest |theirs|), the share of elements that differ and,
for bfloat16, the largest distance in bfloat16 steps. Where mergekit writes a tensor in
another dtype than ours (a documented deviation), its values are rounded to our dtype first
and the row says `mk_dtype=...`. mergekit's arcee_fusion takes the threshold of tensors over 1e6
elements from a random sample (mergeflow's is exact), so those are reported apart and left out
of the verdict.
Verdict (issue 3): float32 PASS when max_rel < 1e-5; bfloat16 PASS when no element is more
than 1 ulp off and under 0.1% of elements differ.

Top-k methods (ties, breadcrumbs, breadcrumbs_ties, sce): elements equal to the k-th largest
value are kept by flat index here and by whichever order mergekit's sort puts first there
(METHODS.md, "Top-k"). Their verdict compares with mergekit run with that one ordering made
the index rule (benchmarks/mergekit_index_ties.py), and `tied` counts the elements where plain
mergekit's output differs from that run: the elements tied at the cut.

Random methods (dare_*, della*) cannot match bit for bit (mergekit uses one global
generator), so they print the relative difference of the kept fraction and of the L1 norm of
the merged task vector, worst over all tensors and worst over tensors of at least
`--min-numel` elements (`*_big`), and over the whole model (`*_model`); `kept_z` is the
largest kept-fraction difference in standard deviations of two independent binomial samples
of the tensor's size (about 3 is what sampling noise alone gives over a few dozen tensors).
Verdict: PASS when all are within 1%; PASS(big) when only the small tensors (where sampling
noise alone exceeds 1%) do not.
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
TOPK = {"ties", "breadcrumbs", "breadcrumbs_ties", "sce"}
INDEX_TIES = Path(__file__).with_name("mergekit_index_ties.py")
SAMPLED_NUMEL = 1_000_000  # mergekit's arcee_fusion takes its quantiles from a random sample above this
EXAMPLES = "examples/models/"
FAMILY = ("instruct", "code", "math")


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def run(cmd: list[str], threads: int | None = None) -> float:
    start = time.monotonic()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
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
    row: dict[str, float] = {}
    if theirs.dtype != ours.dtype:  # a documented output-dtype deviation: compare after rounding
        row["mk_dtype"] = str(theirs.dtype).removeprefix("torch.")
        theirs = theirs.to(ours.dtype)
    a, b = ours.float(), theirs.float()
    diff = (a - b).abs()
    scale = b.abs().max().clamp_min(1e-12)
    row.update({"max_abs": float(diff.max()), "max_rel": float(diff.max() / scale),
                "differ": float((diff > 0).float().mean())})
    if ours.dtype == torch.bfloat16:
        row["ulps"] = ulps_bf16(ours, theirs)
    return row


def compare_random(ours: torch.Tensor, theirs: torch.Tensor, base: torch.Tensor | None) -> dict[str, float]:
    """Raw statistics of the two merged task vectors; `summarize_random` turns them into ratios."""
    ref = base.float() if base is not None else torch.zeros_like(ours, dtype=torch.float32)
    da, db = ours.float() - ref, theirs.float() - ref
    return {"numel": ours.numel(), "kept_a": float((da != 0).sum()), "kept_b": float((db != 0).sum()),
            "l1_a": float(da.abs().sum()), "l1_b": float(db.abs().sum())}


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def prepare(config: Path, dtype: str, work: Path, family: Path | None, vlm: Path | None = None) -> Path:
    text = config.read_text()
    if dtype != "keep":
        data = yaml.safe_load(text)
        data.pop("dtype", None)
        data.pop("out_dtype", None)
        if dtype != "none":
            data["dtype"] = dtype
        text = yaml.safe_dump(data, sort_keys=False)
    if family is not None:
        text = text.replace(EXAMPLES, f"{family}/")
    if vlm is not None:
        text = text.replace("VLM/", f"{vlm}/")
    out = work / config.name
    out.write_text(text)
    return out


def parity(config: Path, args, work: Path) -> list[tuple[str, dict]]:
    cfg = prepare(config, args.dtype, work, args.family, args.vlm)
    data = yaml.safe_load(cfg.read_text())
    method = data["merge_method"]
    mk_out, mf_out = work / f"mk-{config.stem}", work / f"mf-{config.stem}"
    t_mk = run([args.mergekit, str(cfg), str(mk_out), "--allow-crimes"], args.mk_threads)
    t_mf = run([sys.executable, "-m", "mergeflow.cli", "run", str(cfg), str(mf_out), "--force",
                "--quiet", "--scheduler", "threads"])
    ours, theirs = tensors(mf_out), tensors(mk_out)
    tied = {}
    if method in TOPK:  # compare with mergekit's merge under the index rule; count the ties
        run([str(Path(args.mergekit).with_name("python")), str(INDEX_TIES), str(cfg), str(work / f"mki-{config.stem}"),
             "--allow-crimes"], args.mk_threads)
        plain, theirs = theirs, tensors(work / f"mki-{config.stem}")
        tied = {k: int((plain[k] != theirs[k]).sum()) for k in plain}
    if set(ours) != set(theirs):
        raise RuntimeError(f"{config.name}: tensor names differ: only ours {sorted(set(ours) - set(theirs))[:3]}, "
                           f"only mergekit's {sorted(set(theirs) - set(ours))[:3]}")
    base = tensors(ROOT / data["base_model"]) if method in RANDOM and data.get("base_model") else {}
    rows = []
    for name in sorted(ours):
        if method in RANDOM:
            rows.append((name, compare_random(ours[name], theirs[name], base.get(name))))
        else:
            row = compare(ours[name], theirs[name])
            if name in tied:
                row["tied"] = tied[name]
            if method == "arcee_fusion" and ours[name].numel() > SAMPLED_NUMEL:
                row["sampled"] = "yes"
            rows.append((name, row))
    print(f"# {config.name}: mergekit {t_mk:.1f} s, mergeflow {t_mf:.1f} s", file=sys.stderr)
    return rows


def verdict(worst: dict[str, float]) -> str:
    if "ulps" not in worst:  # float32 (or wider) outputs
        return "PASS" if worst["max_rel"] < 1e-5 else "FAIL"
    return "PASS" if worst["ulps"] <= 1 and worst["differ"] < 1e-3 else "FAIL"


def _worst(rows: list[dict]) -> dict[str, float]:
    keys = dict.fromkeys(k for r in rows for k in r if k not in ("mk_dtype", "tied", "sampled"))
    return {k: max(r[k] for r in rows if k in r) for k in keys}


def summarize(method: str, rows: list[tuple[str, dict]]) -> str:
    """Worst values over the tensors (top-k methods: against mergekit under the index rule,
    with the elements tied at the cut counted over the whole model)."""
    exact = [r for _, r in rows if "sampled" not in r]
    sampled = [r for _, r in rows if "sampled" in r]
    worst = _worst(exact or sampled)
    mk_dtypes = sorted({r["mk_dtype"] for _, r in rows if "mk_dtype" in r})
    note = f" mk_dtype={','.join(mk_dtypes)}" if mk_dtypes else ""
    if any("tied" in r for _, r in rows):
        tied = sum(r["tied"] for _, r in rows)
        note += f" tied={tied} elements (plain mergekit vs ties by index, whole model)"
    if sampled:
        note += (f" | {len(sampled)} tensors mergekit samples (> {SAMPLED_NUMEL} elements): differ<="
                 f"{_worst(sampled)['differ']:.3g}")
    return (f"{method:18} {len(rows):5d} {verdict(worst):8} "
            + " ".join(f"{k}={v:.3g}" for k, v in worst.items()) + note)


def summarize_random(method: str, rows: list[tuple[str, dict]], min_numel: int) -> str:
    def worst(rs, key):
        return max((rel(r[f"{key}_a"], r[f"{key}_b"]) for r in rs), default=0.0)

    def z(r):  # the kept-fraction difference in standard deviations of two binomial samples
        pa, pb = r["kept_a"] / r["numel"], r["kept_b"] / r["numel"]
        sd = ((pa * (1 - pa) + pb * (1 - pb)) / r["numel"]) ** 0.5
        return abs(pa - pb) / sd if sd > 0 else 0.0
    every = [r for _, r in rows]
    big = [r for r in every if r["numel"] >= min_numel]
    total = {k: sum(r[k] for r in every) for k in ("kept_a", "kept_b", "l1_a", "l1_b")}
    stats = {"kept_rel": worst(every, "kept"), "l1_rel": worst(every, "l1"),
             "kept_rel_big": worst(big, "kept"), "l1_rel_big": worst(big, "l1"),
             "kept_rel_model": rel(total["kept_a"], total["kept_b"]),
             "l1_rel_model": rel(total["l1_a"], total["l1_b"]),
             "kept_z": max(z(r) for r in every)}
    if stats["kept_rel"] < 0.01 and stats["l1_rel"] < 0.01:
        mark = "PASS"
    elif big and stats["kept_rel_big"] < 0.01 and stats["l1_rel_big"] < 0.01:
        mark = "PASS(big)"
    else:
        mark = "FAIL"
    return (f"{method:18} {len(rows):5d} {mark:9} " + " ".join(f"{k}={v:.3g}" for k, v in stats.items())
            + f" (big: {len(big)} tensors >= {min_numel})")


def per_tensor(method: str, rows: list[tuple[str, dict]]) -> str:
    lines = []
    for name, r in rows:
        if "kept_a" in r:
            r = {"numel": r["numel"], "kept_rel": rel(r["kept_a"], r["kept_b"]),
                 "l1_rel": rel(r["l1_a"], r["l1_b"])}
        lines.append(f"{method:18} {name:55} " + " ".join(
            f"{k}={v}" if isinstance(v, str) else f"{k}={v:.3g}" for k, v in r.items()))
    return "\n".join(lines)


def make_family(hidden: int, intermediate: int | None, work: Path) -> Path:
    from mergeflow.testing import make_family as build

    root = work / f"family-{hidden}"
    build(root, seed=0, finetunes=FAMILY, noise=0.01, hidden=hidden,
          intermediate=intermediate or hidden * 2)
    return root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("methods", nargs="*", help="methods to check (configs/<method>.yml); default all")
    parser.add_argument("--config", type=Path, action="append", help="a config to check instead")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "none", "keep"],
                        help="the configs' dtype (none: no dtype, inputs keep their own; keep: as the "
                        "config says). Default bfloat16, and keep with --corpus")
    parser.add_argument("--corpus", action="store_true", help="check configs/corpus/*.yml (mergekit-style "
                        "configs, modules: included) instead of configs/<method>.yml")
    parser.add_argument("--mergekit", default=os.environ.get("MERGEKIT_YAML", "/work/mkvenv/bin/mergekit-yaml"))
    parser.add_argument("--per-tensor", action="store_true", help="one line per tensor")
    parser.add_argument("--family", type=Path, help="directory with base/instruct/code/math to use "
                        "instead of examples/models")
    parser.add_argument("--make-family", type=int, metavar="HIDDEN",
                        help="build a temporary family with this hidden size and use it")
    parser.add_argument("--intermediate", type=int, help="--make-family: MLP size (default 2 * hidden)")
    parser.add_argument("--mk-threads", type=int, default=1,
                        help="torch threads for mergekit (OMP_NUM_THREADS; 0: its default). "
                        "mergeflow's tasks run with one torch thread each, and a float32 "
                        "reduction over a large tensor depends on the thread count")
    parser.add_argument("--min-numel", type=int, default=16384,
                        help="random methods: the *_big columns count tensors of at least this size")
    args = parser.parse_args()
    if not Path(args.mergekit).exists():
        print(f"mergekit-yaml not found at {args.mergekit}; install mergekit==0.1.5 in a separate venv "
              "and pass --mergekit", file=sys.stderr)
        return 2
    from mergeflow.methods import REGISTRY

    args.dtype = args.dtype or ("keep" if args.corpus else "bfloat16")
    args.vlm = None
    if args.corpus:
        configs = [p for p in sorted((ROOT / "configs" / "corpus").glob("*.yml"))
                   if "# expect-exit: 2" not in p.read_text()]
    else:
        configs = args.config or [ROOT / "configs" / f"{m}.yml" for m in (args.methods or REGISTRY)]
    print(f"{'method':18} {'tensors':>5} verdict  worst over tensors (dtype {args.dtype})")
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        if args.make_family:
            args.family = make_family(args.make_family, args.intermediate, Path(tmp))
        if args.corpus:
            from mergeflow.testing import make_vlm_family

            args.vlm = make_vlm_family(Path(tmp) / "vlm")["base"].parent
        if args.family is not None:
            args.family = args.family.resolve()
        for config in configs:
            try:
                rows = parity(config, args, Path(tmp))
            except RuntimeError as e:
                print(f"{config.stem:18} FAILED: {str(e)[-400:]}")
                failed += 1
                continue
            if args.per_tensor:
                print(per_tensor(config.stem, rows))
            if rows and "kept_a" in rows[0][1]:
                line = summarize_random(config.stem, rows, args.min_numel)
            else:
                line = summarize(config.stem, rows)
            failed += "FAIL" in line.split()[2]
            print(line, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
