"""`mergeflow run CONFIG OUT`: plan, then merge into OUT."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

from mergeflow.cli.plan import _memory, _plan
from mergeflow.cli.process import _return_freed_memory


def cmd_run(args) -> int:
    import torch

    from mergeflow.output.merge import run_merge

    torch.set_num_threads(_torch_threads(args))
    _return_freed_memory()
    plan = _plan(args)
    gc.freeze()  # the ~200k objects of torch, dask and the plan: the merge's collections skip them
    for w in plan.warnings + tuple(_memory(args, plan).warnings()):
        print(f"warning: {w}", file=sys.stderr)
    summary = run_merge(plan, Path(args.out), _options(args))
    print(summary.text(), file=sys.stderr)
    return 0


def _options(args):
    """The execution options of `run` (and `multi`) as RunOptions."""
    from mergeflow.exec.run import RunOptions

    address = args.scheduler_address or (os.environ.get("DASK_SCHEDULER_ADDRESS") or None
                                         if args.scheduler == "distributed" else None)
    return RunOptions(scheduler=args.scheduler, workers=args.workers,
                      threads_per_worker=args.threads_per_worker, processes=args.processes,
                      memory_limit=args.memory_limit, dashboard_address=args.dashboard_address,
                      scheduler_address=address, device=args.device,
                      resume=args.resume, force=args.force, quiet=args.quiet)


def _torch_threads(args) -> int:
    """torch's intra-op threads here: the cores shared among the tasks this process runs at
    once (a thread per task; 2 torch threads under 2 task threads measured 1.5x slower)."""
    from mergeflow.exec.budget import worker_threads

    cores = os.cpu_count() or 1
    if args.scheduler == "sync" or args.processes:  # process workers set their own
        return cores
    if args.scheduler == "threads":
        return max(1, cores // (args.threads_per_worker or cores))
    return max(1, cores // ((args.workers or 1) * worker_threads(args.threads_per_worker, args.workers, False)))
