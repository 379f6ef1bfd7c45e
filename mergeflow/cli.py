"""The `mergeflow` command: run, validate, plan, methods.

The only place that configures the process (logging, warnings, torch threads). A user error
(MergeflowError) exits 2 with its message and no traceback; `-v` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path

from mergeflow import __version__
from mergeflow.errors import MergeflowError

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1


def parse_size(text: str) -> int:
    """`5GB`, `500MB`, `1.5G`, `2e9` or a plain byte count."""
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    try:
        if s and s[-1] in mult:
            return int(float(s[:-1]) * mult[s[-1]])
        return int(float(s))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 5GB, 500MB)") from None


def memory_limit(text: str) -> str:
    """A size as parse_size reads it, or `auto`; kept as text for dask."""
    if text.strip().lower() != "auto":
        parse_size(text)
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergeflow", description="Merge pretrained language "
                                     "models from a mergekit-format YAML config, through a Dask graph.")
    parser.add_argument("--version", action="version", version=f"mergeflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="merge: CONFIG in, a model directory OUT out")
    run.add_argument("config", help="the merge config (YAML, mergekit format)")
    run.add_argument("out", help="output directory")
    _plan_options(run)
    g = run.add_argument_group("execution")
    g.add_argument("--scheduler", choices=["distributed", "threads", "sync"], default="distributed",
                   help="distributed (default): a local Dask cluster with dashboard; threads: dask's "
                        "threaded scheduler; sync: one thread, for debugging")
    g.add_argument("--scheduler-address", default=None,
                   help="run on an existing Dask cluster (also $DASK_SCHEDULER_ADDRESS)")
    g.add_argument("--workers", type=int, default=None, help="local workers (default: 1, or one per "
                   "core with --processes)")
    g.add_argument("--threads-per-worker", type=int, default=None, help="threads per worker (default: the cores divided among the workers)")
    g.add_argument("--processes", action="store_true", help="local workers are processes (each tensor's load, merge and write are one task)")
    g.add_argument("--memory-limit", default=None, type=memory_limit,
                   help="memory budget per worker, e.g. 4GB")
    g.add_argument("--dashboard-address", default="127.0.0.1:8787",
                   help="where the Dask dashboard listens (default 127.0.0.1:8787)")
    g.add_argument("--device", default="cpu", help="where merge ops run: cpu, cuda (one process worker per GPU when there are several) or cuda:N")
    g.add_argument("--resume", action="store_true", help="continue an interrupted merge in OUT")
    g.add_argument("--force", action="store_true", help="overwrite a non-empty OUT")
    g.add_argument("--quiet", action="store_true", help="no progress bar")

    val = sub.add_parser("validate", help="check a config (and its models' headers) without merging")
    val.add_argument("config")
    val.add_argument("--config-only", action="store_true", help="check the YAML only; read no model")
    _plan_options(val)

    plan = sub.add_parser("plan", help="dry run: output tensors, bytes read and written, shards")
    plan.add_argument("config")
    plan.add_argument("--tensors", action="store_true", help="list every output tensor")
    _plan_options(plan)
    g = plan.add_argument_group("memory estimate (as `mergeflow run` would use them)")
    g.add_argument("--workers", type=int, default=None, help="local workers")
    g.add_argument("--threads-per-worker", type=int, default=None, help="threads per worker")
    g.add_argument("--processes", action="store_true", help="local workers are processes")
    g.add_argument("--memory-limit", default=None, type=memory_limit, help="memory budget per worker")

    sub.add_parser("methods", help="list the merge methods and their parameters")
    for p in (run, val, plan):
        p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
    return parser


def _plan_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("planning")
    g.add_argument("--out-shard-size", type=parse_size, default=parse_size("5GB"),
                   help="largest output shard (default 5GB)")
    g.add_argument("--random-seed", type=int, default=0, help="seed for random methods (default 0)")
    g.add_argument("--allow-crimes", action="store_true", help="allow merging different architectures")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code from the Hub when loading tokenizers (off by default)")


THP_ENV = "THP_MEM_ALLOC_ENABLE"


def main(argv: list[str] | None = None) -> int:
    # torch backs CPU tensors of 2 MB and more with transparent huge pages: a merge allocates
    # and frees a tensor-sized buffer per op, and faulting those in 4 KB pages cost as much
    # system time as the merge itself (README, "Speed and memory"). Read by torch at its first
    # allocation, so set before torch is imported; worker processes inherit it.
    os.environ.setdefault(THP_ENV, "1")
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    try:
        with _terminal(verbose):
            return COMMANDS[args.command](args)
    except MergeflowError as e:
        if verbose:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the machine's problem (disk full, permissions): the user can fix it
        if verbose:
            traceback.print_exc()
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}" + ("" if verbose else " (rerun with -v for the "
              "traceback)"), file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:  # a bug in mergeflow: a short message, the traceback only with -v
        if verbose:
            traceback.print_exc()
        print(f"error: internal error: {type(e).__name__}: {e}\nThis is a bug in mergeflow"
              + ("" if verbose else "; rerun with -v for the traceback and report it"), file=sys.stderr)
        return EXIT_INTERNAL_ERROR


class _TaskErrorEcho(logging.Filter):
    """Drops distributed's own report of a failed task: the error reaches the user once, below."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Compute Failed") or "ended with CancelledError" in msg)


@contextlib.contextmanager
def _terminal(verbose: bool):
    """Unless -v: warnings as one `warning:` line each and no worker tracebacks; restored after."""
    if verbose:
        yield
        return
    echo = _TaskErrorEcho()
    loggers = [logging.getLogger(n) for n in ("distributed.worker", "distributed.worker.state_machine")]
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *args, **kwargs: print(f"warning: {message}", file=sys.stderr)
        for logger in loggers:
            logger.addFilter(echo)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(echo)


def _plan(args):
    from mergeflow.config import load_config
    from mergeflow.plan import plan_merge

    config = load_config(args.config)
    return plan_merge(config, out_shard_size=args.out_shard_size, random_seed=args.random_seed,
                      allow_crimes=args.allow_crimes, trust_remote_code=args.trust_remote_code)


def cmd_run(args) -> int:
    import torch

    from mergeflow.run import RunOptions, run_merge

    torch.set_num_threads(_torch_threads(args))
    _return_freed_memory()
    address = args.scheduler_address or (os.environ.get("DASK_SCHEDULER_ADDRESS") or None
                                         if args.scheduler == "distributed" else None)
    plan = _plan(args)
    gc.freeze()  # the ~200k objects of torch, dask and the plan: the merge's collections skip them
    for w in plan.warnings + tuple(_memory(args, plan).warnings()):
        print(f"warning: {w}", file=sys.stderr)
    options = RunOptions(scheduler=args.scheduler, workers=args.workers,
                         threads_per_worker=args.threads_per_worker, processes=args.processes,
                         memory_limit=args.memory_limit, dashboard_address=args.dashboard_address,
                         scheduler_address=address, device=args.device,
                         resume=args.resume, force=args.force, quiet=args.quiet)
    summary = run_merge(plan, Path(args.out), options)
    print(summary.text(), file=sys.stderr)
    return 0


def _torch_threads(args) -> int:
    """torch's intra-op threads here: the cores shared among the tasks this process runs at
    once (a thread per task; 2 torch threads under 2 task threads measured 1.5x slower)."""
    from mergeflow.memory import worker_threads

    cores = os.cpu_count() or 1
    if args.scheduler == "sync" or args.processes:  # process workers set their own
        return cores
    if args.scheduler == "threads":
        return max(1, cores // (args.threads_per_worker or cores))
    return max(1, cores // ((args.workers or 1) * worker_threads(args.threads_per_worker, args.workers, False)))


def _return_freed_memory() -> None:
    """glibc only: blocks of 4 MB and more are mmapped and unmapped when freed, in this process
    and its worker processes. By default glibc raises that threshold as big blocks are freed and
    then keeps freed tensors in its arenas: a merge in row blocks measured 531 MB peak instead of
    380 MB, the 2 GB linear benchmark 900 MB instead of 650 MB (for ~15% more system time).
    Smaller blocks (the float32 temporaries of a streamed merge's row chunks, memory.py)
    stay in the heap: up to 8 MB of free heap is kept instead of 128 KB, so they are reused, not
    faulted in again (the streamed 2 GB linear merge, warm: 2.4-3.5 s with these settings,
    5.7 s with 128k-element chunks under a 1 MB threshold)."""
    import ctypes

    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(4 << 20))  # read by children at start
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(8 << 20))
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, int(os.environ["MALLOC_MMAP_THRESHOLD_"]))  # M_MMAP_THRESHOLD
        libc.mallopt(-1, int(os.environ["MALLOC_TRIM_THRESHOLD_"]))  # M_TRIM_THRESHOLD
    except (OSError, AttributeError, ValueError):  # not glibc
        pass


def _memory(args, plan):
    from mergeflow.memory import budget_for, estimate

    return estimate(plan, budget_for(args.memory_limit, args.threads_per_worker, args.workers, args.processes))


def cmd_validate(args) -> int:
    from mergeflow.config import load_config

    config = load_config(args.config)
    if not args.config_only:
        plan = _plan(args)
        for w in plan.warnings:
            print(f"warning: {w}", file=sys.stderr)
    print(f"{args.config}: ok ({config.merge_method})")
    return 0


def cmd_plan(args) -> int:
    from mergeflow.progress import human_bytes

    plan = _plan(args)
    memory = _memory(args, plan)
    for w in plan.warnings + tuple(memory.warnings()):
        print(f"warning: {w}", file=sys.stderr)
    methods = sorted({t.method for t in plan.tensors})
    print(f"config:         {args.config} ({plan.config.merge_method})")
    print(f"models:         {', '.join(m.label for m in plan.models)}")
    print(f"output tensors: {len(plan.tensors)} ({', '.join(methods)})")
    print(f"bytes read:     {human_bytes(plan.bytes_read)}")
    print(f"bytes written:  {human_bytes(plan.bytes_written)}")
    print(f"shards:         {len(plan.shards)} ({', '.join(s.file for s in plan.shards)})")
    print(f"memory:         {memory.text()}")
    if args.tensors:
        for t in plan.tensors:
            print(f"  {t.name} {list(t.shape)} {t.out_dtype} <- "
                  + ", ".join(plan.models[i.model].label + ":" + i.tensor.name for i in t.all_inputs()))
    return 0


def cmd_methods(args) -> int:
    from mergeflow.methods import REGISTRY

    for name, m in REGISTRY.items():
        base = {"required": "base required", "optional": "base optional", "input": "no base"}[m.base]
        print(f"{name}: {m.doc} ({base})")
        for p in m.params:
            scope = "per model" if p.per_model else "method-wide"
            default = "required" if p.required else f"default {p.default}"
            print(f"    {p.name} ({p.type.__name__}, {scope}, {default}) {p.doc}")
    return 0


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "plan": cmd_plan, "methods": cmd_methods}

if __name__ == "__main__":
    sys.exit(main())
