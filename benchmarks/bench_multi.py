"""Benchmark a three-stage chain as one graph against running its stages one by one.

    python benchmarks/bench_multi.py                     # the ~2 GB family of bench_merge.py
    python benchmarks/bench_multi.py --family bench-data/family-2000MB-4shards-384vocab

The chain (CHAIN): ties of the family's two fine-tunes on its base, then a slerp of that with
ft1, then a frankenmerge of the slerp (layers [0, 2L/3) and [L/3, L): a third of its layers
twice). Measured, with the page cache dropped before each (as root):
  chain          `mergeflow multi CHAIN OUT`: intermediates computed in the graph, never written;
  chain -I       `mergeflow multi CHAIN OUT -I DIR`: intermediates also written as full models;
  one by one     `mergeflow run` of each stage on the previous stage's output (the total, and
                 each stage);
  mergekit-multi `mergekit-multi CHAIN -I DIR --out-path OUT` (0.1.5) with --mergekit-multi.
Every run gets --memory-limit (default 1GB; mergekit has none). The table: wall and CPU time,
bytes written (every file the run leaves, intermediates included), peak RSS and peak anonymous
memory (bench_merge.py's sampling; one by one: the largest stage's). The family is
bench_merge.py's (built under --data if missing), or --family DIR (read only).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import ROOT, Result, drop_caches, family, mb, parse_size, run_measured  # noqa: E402

CHAIN = """name: ties
merge_method: ties
base_model: {base}
models:
  - {{model: {ft1}, parameters: {{weight: 0.5, density: 0.5}}}}
  - {{model: {ft2}, parameters: {{weight: 0.5, density: 0.5}}}}
dtype: bfloat16
---
name: slerp
merge_method: slerp
base_model: ties
models:
  - model: ties
  - model: {ft1}
parameters: {{t: 0.3}}
dtype: bfloat16
---
merge_method: passthrough
slices:
  - sources: [{{model: slerp, layer_range: [0, {two_thirds}]}}]
  - sources: [{{model: slerp, layer_range: [{third}, {layers}]}}]
dtype: bfloat16
"""


def chain_text(models: dict[str, Path]) -> str:
    import json

    layers = json.loads((models["base"] / "config.json").read_text())["num_hidden_layers"]
    return CHAIN.format(**models, layers=layers, third=layers // 3, two_thirds=layers - layers // 3)


def stages(text: str, work: Path) -> list[tuple[Path, Path]]:
    """(config, output) of each stage run on its predecessor's output directory."""
    outs = {"ties": work / "stage-ties", "slerp": work / "stage-slerp"}
    found = []
    for doc, out in zip(text.split("---\n"), [outs["ties"], outs["slerp"], work / "stage-output"]):
        for name, path in outs.items():
            doc = doc.replace(f"name: {name}\n", "").replace(f"model: {name}", f"model: {path}")
        config = work / f"{out.name}.yml"
        config.write_text(doc)
        found.append((config, out))
    return found


def written(*dirs: Path) -> int:
    return sum(f.stat().st_size for d in dirs if d.exists() for f in d.rglob("*") if f.is_file())


def measure(cmd: list[str], log: Path, cold: bool) -> Result:
    if cold:
        drop_caches()
    return run_measured(cmd, log)


def mergeflow(*args: str) -> list[str]:
    return [sys.executable, "-m", "mergeflow.cli", *args, "--quiet", "--force"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", type=Path, help="an existing family directory (base, ft1, ft2), read only")
    parser.add_argument("--size", default="2GB", help="bench_merge.py's family size when --family is not given")
    parser.add_argument("--data", type=Path, default=ROOT / "bench-data", help="where the runs go")
    parser.add_argument("--memory-limit", default="1GB")
    parser.add_argument("--mergekit-multi", default=None, help="also run this mergekit-multi")
    parser.add_argument("--warm", action="store_true", help="do not drop the page cache between runs")
    args = parser.parse_args()
    models = ({n: args.family.resolve() / n for n in ("base", "ft1", "ft2")} if args.family
              else family(args.data, parse_size(args.size), 4, 384))
    work = args.data / "multi-runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    text = chain_text(models)
    config = work / "chain.yml"
    config.write_text(text)
    cold = not args.warm and drop_caches()
    limit = ["--memory-limit", args.memory_limit]
    rows = []
    out = work / "chain-out"
    r = measure(mergeflow("multi", str(config), str(out), *limit), work / "chain.log", cold)
    rows.append(("chain (one graph)", r, written(out)))
    shutil.rmtree(out)
    out, inter = work / "chainI-out", work / "chainI-inter"
    r = measure(mergeflow("multi", str(config), str(out), "-I", str(inter), *limit), work / "chainI.log", cold)
    rows.append(("chain -I (intermediates written)", r, written(out, inter)))
    shutil.rmtree(out)
    shutil.rmtree(inter)
    each = []
    for stage_config, stage_out in stages(text, work):
        r = measure(mergeflow("run", str(stage_config), str(stage_out), *limit), work / f"{stage_out.name}.log", cold)
        each.append((stage_out.name, r, written(stage_out)))
    total = Result(sum(r.seconds for _, r, _ in each), None, sum(r.cpu for _, r, _ in each))
    rows.append(("one by one (3 x mergeflow run)", total, sum(n for _, _, n in each), max(
        (r for _, r, _ in each), key=lambda r: r.peak.anon)))
    rows += [(f"  {name}", r, n) for name, r, n in each]
    for _, stage_out in stages(text, work):
        shutil.rmtree(stage_out, ignore_errors=True)
    if args.mergekit_multi:
        out, inter = work / "mk-out", work / "mk-inter"
        r = measure([args.mergekit_multi, str(config), "-I", str(inter), "--out-path", str(out), "--quiet"],
                    work / "mk.log", cold)
        rows.append(("mergekit-multi -I", r, written(out, inter)))
        shutil.rmtree(out)
        shutil.rmtree(inter)
    print(table(rows, models, args, cold))
    return 0


def table(rows, models, args, cold: bool) -> str:
    size = sum(f.stat().st_size for m in models.values() for f in m.glob("*.safetensors"))
    chain = rows[0][1].seconds
    lines = [f"`python benchmarks/bench_multi.py {' '.join(sys.argv[1:])}`".replace(" `", "`"), "",
             f"3 models x {mb(size / 3)} bf16; --memory-limit {args.memory_limit} (mergeflow); "
             + ("page cache dropped before every run" if cold else "warm page cache"), "",
             "| run | wall s | CPU s | x chain | written | peak RSS | peak anon |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        name, r, nbytes = row[:3]
        peak = row[3].peak if len(row) > 3 else r.peak
        mem = f"{mb(max(peak.rss, peak.hwm))} | {mb(peak.anon)}" if peak else " | "
        lines.append(f"| {name} | {r.seconds:.1f} | {r.cpu:.1f} | {r.seconds / chain:.2f} | {mb(nbytes)} | {mem} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
