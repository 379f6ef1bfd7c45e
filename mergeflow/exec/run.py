"""Run a graph: pick the scheduler, feed the progress bar, report failures.

Schedulers: "distributed" (default: an in-process LocalCluster with the dashboard, a
multi-process one with --processes, one process per GPU, or an existing cluster at
--scheduler-address; see cluster.py), "threads" (dask's threaded scheduler) and "sync"
(one thread, for debugging).
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

import dask

from mergeflow.errors import MergeflowError
from mergeflow.exec import cluster
from mergeflow.exec.progress import Progress
from mergeflow.spec.sizes import parse_size

SCHEDULERS = ("distributed", "threads", "sync")


@dataclass(frozen=True)
class RunOptions:
    scheduler: str = "distributed"  # distributed | threads | sync
    workers: int | None = None
    threads_per_worker: int | None = None
    processes: bool = False
    memory_limit: str | int | None = None  # per worker, e.g. "4GB" or "auto"; held in bytes
    dashboard_address: str = "127.0.0.1:8787"
    scheduler_address: str | None = None
    device: str = "cpu"
    resume: bool = False
    force: bool = False
    quiet: bool = False
    # what OUT gets besides the tensors (mergekit-yaml's flags of the same names)
    copy_tokenizer: bool = True  # False: no tokenizer files unless the config builds one
    write_model_card: bool = True  # False: no README.md and no mergeflow_config.yml
    safe_serialization: bool = True  # False: pytorch_model*.bin (output/bin.py)

    def __post_init__(self) -> None:
        if self.memory_limit is None or str(self.memory_limit).strip().lower() == "auto":
            return
        try:  # the one size reader (spec/sizes.py), as for --memory-limit
            object.__setattr__(self, "memory_limit", parse_size(self.memory_limit))
        except ValueError as e:
            raise MergeflowError(f"RunOptions memory_limit: {e}") from None


@dataclass(frozen=True)
class _Where:
    """Where the graph runs: an existing cluster's address, GPUs for local workers, and
    whether each tensor is one fused task (process workers and remote clusters)."""

    address: str | None
    gpus: tuple[str, ...]
    fuse: bool


def _where(options: RunOptions) -> _Where:
    """Check the execution options against each other (before anything is written)."""
    if options.scheduler not in SCHEDULERS:
        raise MergeflowError(f"unknown scheduler {options.scheduler!r}; use one of {', '.join(SCHEDULERS)}")
    address = options.scheduler_address
    local = [f"--{n.replace('_', '-')}" for n in ("workers", "threads_per_worker", "processes")
             if getattr(options, n)]
    if address and options.scheduler != "distributed":
        raise MergeflowError(f"--scheduler-address runs on a Dask cluster; it cannot be combined with "
                             f"--scheduler {options.scheduler}")
    if address and local:
        raise MergeflowError(f"{', '.join(local)}: these size a local cluster; the cluster at {address} "
                             "brings its own workers. Drop them, or drop --scheduler-address")
    unused = {"sync": local, "threads": [o for o in local if o != "--threads-per-worker"]}
    if unused.get(options.scheduler):
        raise MergeflowError(f"{', '.join(unused[options.scheduler])}: not used by --scheduler "
                             f"{options.scheduler}; they apply to the default (distributed) scheduler")
    for name in ("workers", "threads_per_worker"):
        if getattr(options, name) is not None and getattr(options, name) < 1:
            raise MergeflowError(f"--{name.replace('_', '-')} must be at least 1")
    if not address:  # a remote cluster's workers are checked for CUDA instead
        cluster.check_device(options.device)
    gpus = tuple(cluster.gpu_ids(options.device)) if options.scheduler == "distributed" and not address else ()
    fuse = bool(address) or options.processes or len(gpus) > 1
    return _Where(address, gpus, fuse)


def _execute(dsk, writes, finals, options: RunOptions, where: _Where, progress: Progress, log, check):
    if options.scheduler in ("sync", "threads"):
        _run_local(dsk, set(writes), finals, options, progress)
        return None, _peak_rss()
    return _run_distributed(dsk, writes, finals, options, where, progress, log, check)


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
        local, client = cluster.connect(options, where.address, list(where.gpus))
        remote = local is None
        try:
            dashboard = client.dashboard_link if remote else _local_link(client.dashboard_link, options)
            if dashboard:
                log(f"dashboard: {dashboard}")
            check(client)
            cluster.setup_workers(client, remote=remote, processes=options.processes or len(where.gpus) > 1)
            futures = client.get(dsk, writes + finals, sync=False,
                                 resources=cluster.task_resources(dsk, list(where.gpus)))
            try:
                for fut in as_completed(futures[: len(writes)]):
                    progress.advance(fut.result())
                client.gather(futures[len(writes):])
            except KilledWorker as e:
                raise MergeflowError(f"{e.task[-1] if isinstance(e.task, tuple) else e.task}: each of the "
                                     f"{e.allowed_failures + 1} workers that ran its task died (the last: "
                                     f"{e.last_worker.address}); out of memory? Raise --memory-limit or use "
                                     "fewer threads per worker") from None
            peak = max(client.run(_peak_rss).values(), default=0)
            return dashboard, peak
        finally:
            cluster.release_workers(client, remote=remote)
            client.close()
            if local is not None:
                local.close()


def _local_link(link: str, options: RunOptions) -> str:
    """The dashboard link with the host it listens on (dask names the machine's address)."""
    host = options.dashboard_address.rpartition(":")[0]
    if not host or host in ("0.0.0.0", "::", "[::]"):
        return link
    scheme, _, rest = link.partition("://")
    return f"{scheme}://{host}:{rest.partition(':')[2]}" if ":" in rest else link


def _peak_rss() -> int:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
