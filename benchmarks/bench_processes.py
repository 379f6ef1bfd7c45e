"""Process workers against the in-process (threaded) cluster, on this machine's cores.

    python benchmarks/bench_processes.py                       # ~130 MB x 3 family, ties and linear
    python benchmarks/bench_processes.py --size 400MB ties --repeat 2

Builds (once, under --data, default ./bench-data, git-ignored) a base and two fine-tunes of
about --size each (bfloat16), then runs `mergeflow run CONFIG OUT --force -v` as a
subprocess for each method and each layout:
  threads        the default: one in-process worker, a thread per core
  processes      --processes with its default sizes (see cluster.local_sizes)
  processes x1   --processes --workers 1 (one process worker, a thread per core)
  processes xN   --processes --workers N --threads-per-worker 1 (N = the cores)
and prints a markdown table: wall time (the fastest of --repeat runs, warm page cache),
CPU time of the process tree, peak RSS summed over the process tree (sampled every 10 ms),
and how many "Worker process still alive" warnings the run logged (-v shows Dask's log).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_merge import _status, config_text, family, parse_size  # noqa: E402


def layouts(cores: int) -> dict[str, list[str]]:
    return {"threads": [], "processes": ["--processes"], "processes x1": ["--processes", "--workers", "1"],
            f"processes x{cores}": ["--processes", "--workers", str(cores), "--threads-per-worker", "1"]}


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (children of every thread: the nanny starts workers from
    its event loop's thread)."""
    pids, i = [pid], 0
    while i < len(pids):
        for task in Path(f"/proc/{pids[i]}/task").glob("*"):
            try:
                pids += [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                pass
        i += 1
    return pids


def run(cmd: list[str]) -> tuple[float, float, int, int, str]:
    """(wall s, CPU s of the tree, peak RSS of the tree, exit code, stderr) of `cmd`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], sum(_status(p).get("VmRSS", 0) for p in _tree(proc.pid)))
            time.sleep(0.01)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    err = proc.communicate()[1]
    wall = time.monotonic() - started
    done.set()
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, peak[0], proc.returncode, err


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("methods", nargs="*", default=["ties", "linear"])
    ap.add_argument("--size", default="130MB", help="size of each input model")
    ap.add_argument("--data", default=str(ROOT / "bench-data"))
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    models = family(Path(args.data), parse_size(args.size), 1, 384)
    runs = Path(args.data) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    print(f"{cores} cores; inputs {args.size} x 3 (bfloat16); the fastest of {args.repeat} run(s), warm\n")
    print("| method | workers | wall s | CPU s | peak RSS (tree) | 'still alive' warnings |")
    print("|---|---|---:|---:|---:|---:|")
    for method in args.methods:
        config = runs / f"procs-{method}.yml"
        config.write_text(config_text(method, models))
        for name, flags in layouts(cores).items():
            best = None
            for _ in range(args.repeat):
                cmd = [sys.executable, "-m", "mergeflow.cli", "run", str(config), str(runs / "procs-out"),
                       "--force", "-v", "--dashboard-address", "none", *flags]
                wall, cpu, peak, rc, err = run(cmd)
                if rc != 0:
                    print(f"# {method} {name}: exit {rc}\n{err[-2000:]}", file=sys.stderr)
                    break
                alive = err.count("Worker process still alive")
                if best is None or wall < best[0]:
                    best = (wall, cpu, peak, alive)
            if best:
                wall, cpu, peak, alive = best
                print(f"| {method} | {name} | {wall:.1f} | {cpu:.1f} | {peak / 1e6:,.0f} MB | {alive} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
