"""Benchmark a merge against the I/O floor (and mergekit): wall time and peak memory.

    python benchmarks/bench_merge.py                  # both families, six methods, 2GB budget
    python benchmarks/bench_merge.py --families 2GB --size 500MB linear   # smaller, one method
    python benchmarks/bench_merge.py --with-mergekit ties                 # mergekit beside it

Generates (once, under --data, default ./bench-data, git-ignored) two families of a base model
and two fine-tunes (bfloat16, mergeflow.testing's builder): `2GB`, of about --size each
(--shards files, --vocab-rows embedding rows), and `big-embedding`, whose tied embedding is
Llama 3's 128256 x 4096 (1.05 GB of its ~1.16 GB). Then measures, in one run and with the page
cache dropped before each (as root; otherwise the table says "warm"):
  floor      a plain loop reading every input file once and writing an output of the merged
             size (fsync'd, as mergeflow's shards are): what the disk allows;
  mergeflow  `mergeflow run CONFIG OUT --memory-limit LIMIT` as a subprocess;
  mergekit   `mergekit-yaml CONFIG OUT` (default options), with --with-mergekit;
for each method (default: linear, ties, dare_ties, della, model_stock, slerp), and prints a
markdown table per family: wall time, CPU time, the ratios to the floor and to
mergekit, peak RSS (resident, file pages included: the sampled sum over the process tree, or
the main process's VmHWM if larger) and peak anonymous memory (RssAnon: heap and tensors,
summed over the process tree, sampled from /proc every 5 ms). --repeat N runs N rounds (the
floor, then every run, so each ratio compares measurements from the same stretch of time)
and keeps the fastest of each (this machine is shared; single runs vary by 2x). Last, it checks
the targets of issue 12: every peak anonymous memory under --memory-limit, and ties within
2.5x of the floor, dare_ties within 2x, linear within 1.2x.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("linear", "ties", "dare_ties", "della", "model_stock", "slerp")
FAMILIES = ("2GB", "big-embedding")
TARGETS = {"ties": 2.5, "dare_ties": 2.0, "linear": 1.2}  # x the I/O floor
BIG = {"hidden": 4096, "layers": 1, "intermediate": 1024, "heads": 32, "kv_heads": 8}  # + 128256 tied rows
CHUNK = 16 * 1024 * 1024


# ----------------------------------------------------------------------------- the model family


def parse_size(text: str) -> int:
    from mergeflow.spec.sizes import parse_size as parse

    return parse(text)


def family(data: Path, size: int, shards: int, vocab_rows: int) -> dict[str, Path]:
    """The base and fine-tunes ft1, ft2 for these options, built once and reused."""
    import torch

    from mergeflow.testing import arch_for_size, make_family

    root = data / (f"family-{size // 10**6}MB-{shards}shards-{vocab_rows}vocab" if size else
                   f"family-big-embedding-{vocab_rows}vocab")
    names = ("base", "ft1", "ft2")
    if all((root / n / "config.json").exists() for n in names):
        return {n: root / n for n in names}
    arch = arch_for_size(size, vocab_rows=vocab_rows) if size else dict(BIG, tie_word_embeddings=True)
    extra = max(0, vocab_rows - 384)  # testing's tokenizer has 384 tokens; the rest are rows only
    print(f"# building {root} ({arch}, {vocab_rows} vocab rows) ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    make_family(root, finetunes=["ft1", "ft2"], shards=shards, overwrite=True, dtype=torch.bfloat16,
                extra_vocab_rows=extra, **arch)
    print(f"# built in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return {n: root / n for n in names}


def config_text(method: str, models: dict[str, Path]) -> str:
    base, ft1, ft2 = (models[n] for n in ("base", "ft1", "ft2"))
    if method == "slerp":
        return f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {ft1}\nparameters: {{t: 0.5}}\ndtype: bfloat16\n"
    if method == "model_stock":
        return f"merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\ndtype: bfloat16\n"
    if method == "linear":
        return ("merge_method: linear\nmodels:\n"
                + "".join(f"  - model: {m}\n    parameters: {{weight: {w}}}\n" for m, w in ((base, 0.4), (ft1, 0.3), (ft2, 0.3)))
                + "dtype: bfloat16\n")
    return (f"merge_method: {method}\nbase_model: {base}\nmodels:\n"
            + "".join(f"  - model: {m}\n    parameters: {{weight: 0.5, density: 0.5}}\n" for m in (ft1, ft2))
            + "dtype: bfloat16\n")


def weight_files(model: Path) -> list[Path]:
    return sorted(model.glob("*.safetensors"))


# ----------------------------------------------------------------------------- measuring


def drop_caches() -> bool:
    """Write back and drop the page cache (root only); False when not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def _tree(pid: int) -> list[int]:
    pids, i = [pid], 0
    while i < len(pids):
        try:
            kids = Path(f"/proc/{pids[i]}/task/{pids[i]}/children").read_text().split()
        except OSError:
            kids = []
        pids += [int(k) for k in kids]
        i += 1
    return pids


@dataclass
class Peak:
    """Peaks of the summed RSS and RssAnon of a process tree, and the root's VmHWM."""

    rss: int = 0
    anon: int = 0
    hwm: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def watch(self, pid: int, interval: float = 0.005) -> threading.Thread:
        def loop() -> None:
            while not self._stop.is_set():
                stats = [_status(p) for p in _tree(pid)]
                self.rss = max(self.rss, sum(s.get("VmRSS", 0) for s in stats))
                self.anon = max(self.anon, sum(s.get("RssAnon", 0) for s in stats))
                self.hwm = max(self.hwm, stats[0].get("VmHWM", 0) if stats else 0)
                self.samples += 1
                time.sleep(interval)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        return thread

    def stop(self, thread: threading.Thread) -> None:
        self._stop.set()
        thread.join()


@dataclass(frozen=True)
class Result:
    seconds: float
    peak: Peak | None
    cpu: float = 0.0  # user + system seconds of the process tree


def run_measured(cmd: list[str], log: Path) -> Result:
    with open(log, "w") as out:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        peak = Peak()
        thread = peak.watch(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)  # CPU times of the child and its children
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - started
        peak.stop(thread)
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}; see {log}:\n{log.read_text()[-2000:]}")
    return Result(seconds, peak, usage.ru_utime + usage.ru_stime)


def io_floor(models: dict[str, Path], out_dir: Path) -> Result:
    """Read every input file once and write an output of the merged size: a plain loop."""
    files = [f for m in models.values() for f in weight_files(m)]
    out_bytes = sum(f.stat().st_size for f in weight_files(models["base"]))
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    before = os.times()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    started = time.monotonic()
    fd_out = os.open(out_dir / "out.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    written = 0
    for f in files:
        with open(f, "rb", buffering=0) as src:
            while n := src.readinto(buf):
                if written < out_bytes:
                    written += os.write(fd_out, view[: min(n, out_bytes - written)])
    os.fsync(fd_out)
    os.close(fd_out)
    after = os.times()
    return Result(time.monotonic() - started, None, after.user + after.system - before.user - before.system)


# ----------------------------------------------------------------------------- the runs


def mergeflow_cmd(config: Path, out: Path, args) -> list[str]:
    return [sys.executable, "-m", "mergeflow.cli", "run", str(config), str(out), "--quiet", "--force",
            "--memory-limit", args.memory_limit, *args.mergeflow_args]


def mergekit_cmd(config: Path, out: Path, args) -> list[str]:
    return [args.mergekit, str(config), str(out), "--quiet", *args.mergekit_args]


def summarize(name: str, results: list[Result]) -> Result:
    """The fastest of `results` (wall time), with the largest memory peaks seen over them."""
    best = min(results, key=lambda r: r.seconds)
    peak = None
    if best.peak:
        peak = Peak(max(r.peak.rss for r in results), max(r.peak.anon for r in results),
                    max(r.peak.hwm for r in results))
    times = ", ".join(f"{r.seconds:.1f}" for r in results)
    mem = f", peak RSS {mb(peak.rss)}, anon {mb(peak.anon)}" if peak else ""
    print(f"# {name}: {times} s{mem}", file=sys.stderr, flush=True)
    return Result(best.seconds, peak, best.cpu)


def mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def table(floor: Result, rows: list[tuple[str, str, Result]], notes: list[str], header: str) -> str:
    mk = {m: r.seconds for m, tool, r in rows if tool == "mergekit"}
    lines = [header, "",
             "| method | tool | wall s | CPU s | x floor | x mergekit | peak RSS | peak anon |",
             "|---|---|---:|---:|---:|---:|---:|---:|",
             f"| (I/O floor) | plain read/write loop | {floor.seconds:.1f} | {floor.cpu:.1f} | 1.00 | | | |"]
    for method, tool, r in rows:
        vs_mk = f"{r.seconds / mk[method]:.2f}" if method in mk and tool != "mergekit" else ""
        p = r.peak
        lines.append(f"| {method} | {tool} | {r.seconds:.1f} | {r.cpu:.1f} | {r.seconds / floor.seconds:.2f} | "
                     f"{vs_mk} | {mb(max(p.rss, p.hwm))} | {mb(p.anon)} |")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("methods", nargs="*", default=list(METHODS), help=f"default: {' '.join(METHODS)}")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES),
                        help="model families (default: both)")
    parser.add_argument("--size", default="2GB", help="bytes per model of the 2GB family (default 2GB)")
    parser.add_argument("--shards", type=int, default=4, help="safetensors files per model (default 4)")
    parser.add_argument("--vocab-rows", type=int, default=384, help="2GB family: embedding rows (default 384)")
    parser.add_argument("--data", type=Path, default=ROOT / "bench-data", help="where models and outputs go")
    parser.add_argument("--memory-limit", default="2GB", help="mergeflow's --memory-limit (default 2GB)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; the fastest is shown (default 1)")
    parser.add_argument("--mergekit", default=os.environ.get("MERGEKIT_YAML", "/work/mkvenv/bin/mergekit-yaml"))
    parser.add_argument("--with-mergekit", action="store_true", help="also run mergekit-yaml (slow: "
                        "15 GB and ~450 s for ties on the big embedding)")
    parser.add_argument("--mergeflow-args", default="", help="extra `mergeflow run` options, one string")
    parser.add_argument("--mergekit-args", default="", help="extra mergekit-yaml options, one string")
    parser.add_argument("--warm", action="store_true", help="do not drop the page cache between runs")
    parser.add_argument("--keep", action="store_true", help="keep the merged outputs")
    args = parser.parse_args()
    args.mergeflow_args, args.mergekit_args = args.mergeflow_args.split(), args.mergekit_args.split()
    return args


def _models(args, name: str) -> dict[str, Path]:
    if name == "big-embedding":
        return family(args.data, 0, 2, 128256)
    return family(args.data, parse_size(args.size), args.shards, args.vocab_rows)


def main() -> int:
    args = parse_args()
    from mergeflow.methods import REGISTRY

    families = {name: _models(args, name) for name in args.families}
    work = args.data / "runs"
    work.mkdir(parents=True, exist_ok=True)
    cold = not args.warm and drop_caches()
    notes = [("page cache dropped before every run (cold reads)" if cold else
              "warm page cache (not root, or --warm): reads may come from memory"),
             f"fastest of {args.repeat} run(s) each; memory peaks are the largest over the runs, sampled "
             "from /proc every 5 ms (RSS also from VmHWM); CPU = user + system time"]
    have_mk = args.with_mergekit and Path(args.mergekit).exists()
    if args.with_mergekit and not have_mk:
        notes.append(f"mergekit not run ({args.mergekit} not found)")
    runs: list[tuple[str, str, str, object]] = []
    for fam, models in families.items():
        runs.append((fam, "(I/O floor)", "floor", lambda m=models, f=fam: io_floor(m, work / f"floor-{f}")))
        for method in args.methods:
            config = work / f"{fam}-{method}.yml"
            config.write_text(config_text(method, models))
            tools = [("mergeflow", mergeflow_cmd)] if method in REGISTRY else []
            tools += [("mergekit", mergekit_cmd)] if have_mk else []
            for tool, cmd in tools:
                out = work / f"{fam}-{tool}-{method}"
                command, log = cmd(config, out, args), work / f"{fam}-{tool}-{method}.log"
                runs.append((fam, method, tool, lambda c=command, g=log, o=out: _run(c, g, o, args.keep)))
    # round by round (floor, then every run), so that the floor is measured over the same
    # stretch of time as the runs it is compared with: this shared machine's speed drifts
    results: dict[tuple[str, str, str], list[Result]] = {(f, m, t): [] for f, m, t, _ in runs}
    for _ in range(args.repeat):
        for fam, method, tool, action in runs:
            if cold:
                drop_caches()
            results[fam, method, tool].append(action())
    best = {key: summarize(" ".join(key), r) for key, r in results.items()}
    limit = parse_size(args.memory_limit)
    checks = []
    for fam, models in families.items():
        shutil.rmtree(work / f"floor-{fam}", ignore_errors=True)
        floor = best[fam, "(I/O floor)", "floor"]
        rows = [(m, t, r) for (f, m, t), r in best.items() if f == fam and t != "floor"]
        size = sum(f.stat().st_size for m in models.values() for f in weight_files(m))
        shape = ("a tied 128256 x 4096 embedding" if fam == "big-embedding"
                 else f"{args.shards} shards, {args.vocab_rows} vocab rows")
        header = (f"**{fam}**: 3 models x {mb(size / 3)} bf16 ({shape}), {os.cpu_count()} cores; "
                  f"mergeflow run --memory-limit {args.memory_limit} {' '.join(args.mergeflow_args)}".rstrip())
        print(table(floor, rows, [], header) + "\n")
        for method, tool, r in rows:
            if tool != "mergeflow":
                continue
            ok = r.peak.anon < limit
            checks.append(f"{fam} {method}: peak anon {mb(r.peak.anon)} {'<' if ok else '>='} {args.memory_limit}"
                          + ("" if ok else "  MISSED"))
            if method in TARGETS:
                x = r.seconds / floor.seconds
                checks.append(f"{fam} {method}: {x:.2f}x the floor (target {TARGETS[method]}x)"
                              + ("" if x <= TARGETS[method] else "  MISSED"))
    print(f"`python benchmarks/bench_merge.py {' '.join(sys.argv[1:])}`".replace(" `", "`"))
    print("\n".join(f"- {n}" for n in notes + checks))
    return 0


def _run(cmd: list[str], log: Path, out: Path, keep: bool) -> Result:
    shutil.rmtree(out, ignore_errors=True)
    result = run_measured(cmd, log)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return result


if __name__ == "__main__":
    sys.exit(main())
