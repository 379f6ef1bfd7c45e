"""Run a graph: the scheduler, the progress bar, failures (RunOptions: exec/options.py).

Schedulers: "distributed" (default: an in-process LocalCluster with the dashboard, a
multi-process one with --processes, one process per GPU, or an existing cluster at
--scheduler-address; see cluster.py), "threads" (dask's threaded scheduler) and "sync"
(one thread, for debugging). `_execute` calls its `check` once the scheduler is up and
before any task runs (the caller's last checks, then the first write into OUT), so a
scheduler that cannot be reached leaves OUT as it was.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

import dask

from mergeflow.errors import MergeflowError
from mergeflow.exec import cluster
from mergeflow.exec.budget import Budget, budget_for
from mergeflow.exec.options import SCHEDULERS, RunOptions
from mergeflow.exec.progress import Progress


@dataclass(frozen=True)
class _Where:
    """Where the graph runs: an existing cluster's address and the GPUs for local workers."""

    address: str | None
    gpus: tuple[str, ...]


def _where(options: RunOptions) -> _Where:
    """Check the execution options against each other (before anything is written)."""
    say = options.term
    if options.scheduler not in SCHEDULERS:
        raise MergeflowError(f"unknown scheduler {options.scheduler!r}; use one of {', '.join(SCHEDULERS)}")
    address = options.scheduler_address
    local = [say(n, None) for n in ("workers", "threads_per_worker", "processes") if getattr(options, n)]
    if address and options.scheduler != "distributed":
        raise MergeflowError(f"{say('scheduler_address', None)} runs on a Dask cluster; it cannot be "
                             f"combined with {say('scheduler', options.scheduler)}")
    if address and local:
        raise MergeflowError(f"{', '.join(local)}: these size a local cluster; the cluster at {address} "
                             f"brings its own workers. Drop them, or drop {say('scheduler_address', None)}")
    unused = {"sync": local, "threads": [o for o in local if o != say("threads_per_worker", None)]}
    if unused.get(options.scheduler):
        raise MergeflowError(f"{', '.join(unused[options.scheduler])}: not used by "
                             f"{say('scheduler', options.scheduler)}; they apply to the default "
                             "(distributed) scheduler")
    for name in ("workers", "threads_per_worker"):
        if getattr(options, name) is not None and getattr(options, name) < 1:
            raise MergeflowError(f"{say(name, None)} must be at least 1")
    if not address:  # a remote cluster's workers are checked for CUDA instead
        cluster.check_device(options.device)
    gpus = tuple(cluster.gpu_ids(options.device)) if options.scheduler == "distributed" and not address else ()
    return _Where(address, gpus)


def worker_budget(options: RunOptions, where: _Where | None = None) -> Budget:
    """The memory budget of one worker as the run will size its workers: a local cluster as
    cluster.py makes it (per GPU, or `local_sizes`), else from the options as given."""
    gpus = list(where.gpus) if where is not None else []
    if options.scheduler != "distributed" or options.scheduler_address:
        workers, threads = options.workers, options.threads_per_worker
    elif cluster._per_gpu(options, gpus):
        workers = options.workers or len(gpus)
        threads = options.threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
    else:
        workers, threads = cluster.local_sizes(options)
    return budget_for(options.memory_limit, threads, workers, options.processes)


def _execute(dsk, writes, finals, options: RunOptions, where: _Where, progress: Progress, log, check):
    """Run the graph; `check(client)` (client None off Dask) runs once the scheduler is up,
    before any task. Returns (dashboard link or None, peak RSS of the largest worker)."""
    try:
        if options.scheduler in ("sync", "threads"):
            check(None)
            progress.start()
            _run_local(dsk, set(writes), finals, options, progress)
            return None, _peak_rss()
        return _run_distributed(dsk, writes, finals, options, where, progress, log, check)
    finally:
        progress.close()


def _run_local(dsk, writes: set, finals, options: RunOptions, progress: Progress) -> None:
    from dask.callbacks import Callback

    class Hook(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            if key in writes:
                progress.advance(result)

    if options.scheduler == "sync":
        from dask.local import get_sync

        get_sync(dsk, finals, callbacks=[Hook()._callback])
    else:
        from dask.threaded import get

        get(dsk, finals, num_workers=options.threads_per_worker or os.cpu_count(), callbacks=[Hook()._callback])


def _run_distributed(dsk, writes, finals, options: RunOptions, where: _Where, progress: Progress, log, check):
    from distributed import KilledWorker, as_completed

    with dask.config.set({"distributed.worker.memory.spill": False,
                          "distributed.worker.memory.target": False,
                          # mergeflow's plan keeps tasks inside the budget; pausing a worker
                          # whose memory is held by inputs of pending merges never ends, and
                          # RSS counts mapped input pages the budget leaves out (memory.py)
                          "distributed.worker.memory.pause": False,
                          "distributed.worker.memory.terminate": False,
                          "distributed.scheduler.worker-saturation": 1.1}):
        with cluster.connect(options, where.address, list(where.gpus)) as (client, dashboard):
            if dashboard:
                log(f"dashboard: {dashboard}")
            check(client)
            cluster.setup_workers(client, remote=where.address is not None,
                                  processes=options.processes or len(where.gpus) > 1)
            progress.start()
            futures = client.get(dsk, writes + finals, sync=False,
                                 resources=cluster.task_resources(dsk, list(where.gpus)))
            try:
                for fut in as_completed(futures[: len(writes)]):
                    progress.advance(fut.result())
                client.gather(futures[len(writes):])
            except KilledWorker as e:
                raise MergeflowError(f"{e.task[-1] if isinstance(e.task, tuple) else e.task}: each of the "
                                     f"{e.allowed_failures + 1} workers that ran its task died (the last: "
                                     f"{e.last_worker.address}); out of memory? Raise "
                                     f"{options.term('memory_limit', None)} or use fewer threads per "
                                     "worker") from None
            peak = max(client.run(_peak_rss).values(), default=0)
            return dashboard, peak


def _peak_rss() -> int:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
