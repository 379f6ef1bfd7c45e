"""Run a MergePlan: prepare the output, pick the scheduler, run the graph, write metadata last.

Schedulers: "distributed" (default: an in-process LocalCluster with the dashboard, a
multi-process one with --processes, one process per GPU, or an existing cluster at
--scheduler-address; see cluster.py), "threads" (dask's threaded scheduler) and "sync"
(one thread, for debugging). Resume: the journal is rewritten to what is really on disk
before any shard is (re)created, then only the missing tensors are merged (journal.py).
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import dask

from mergeflow import cluster
from mergeflow.errors import MergeflowError
from mergeflow.graph import build_graph
from mergeflow.io.shards import prepare_shard
from mergeflow.journal import journal_path, on_disk, read_journal, start_journal
from mergeflow.memory import budget_for, fit_budget
from mergeflow.output import check_complete, prepare_output, publish, remove_state
from mergeflow.plan import MergePlan, TensorPlan
from mergeflow.progress import Progress, human_bytes

SCHEDULERS = ("distributed", "threads", "sync")


@dataclass(frozen=True)
class RunOptions:
    scheduler: str = "distributed"  # distributed | threads | sync
    workers: int | None = None
    threads_per_worker: int | None = None
    processes: bool = False
    memory_limit: str | None = None  # per worker, e.g. "4GB"
    dashboard_address: str = "127.0.0.1:8787"
    scheduler_address: str | None = None
    device: str = "cpu"
    resume: bool = False
    force: bool = False
    quiet: bool = False


@dataclass(frozen=True)
class RunSummary:
    out_dir: Path
    tensors: int  # merged by this run
    skipped: int  # already done by an interrupted run (--resume)
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss: int  # the largest peak RSS of one worker (mmapped input pages count)
    dashboard: str | None = None

    def text(self) -> str:
        rate = self.bytes_written / self.seconds if self.seconds else 0
        return (f"merged {self.tensors} tensors into {self.out_dir} in {self.seconds:.1f} s "
                f"({human_bytes(self.bytes_read)} read, {human_bytes(self.bytes_written)} written, "
                f"{human_bytes(rate)}/s; peak worker memory {human_bytes(self.peak_rss)})"
                + (f"; {self.skipped} tensors were already done" if self.skipped else ""))


@dataclass(frozen=True)
class _Where:
    """Where the graph runs: an existing cluster's address, GPUs for local workers, and
    whether each tensor is one fused task (process workers and remote clusters)."""

    address: str | None
    gpus: tuple[str, ...]
    fuse: bool


def run_merge(plan: MergePlan, out_dir: str | Path, options: RunOptions | None = None,
              log=None) -> RunSummary:
    options = options or RunOptions()
    log = log or (lambda msg: None if options.quiet else print(msg, file=sys.stderr, flush=True))
    out_dir = Path(out_dir).resolve()
    started = time.monotonic()
    where = _where(options)
    prepare_output(plan, out_dir, force=options.force, resume=options.resume)
    done, headers = _start(plan, out_dir, options.resume)
    plan = fit_budget(plan, budget_for(options.memory_limit, options.threads_per_worker, options.workers,
                                       options.processes))  # lanes for tensors over budget
    dsk, writes, finals = build_graph(plan, out_dir, device=options.device, skip=done, fuse=where.fuse)
    todo = [t for t in plan.tensors if t.name not in done]
    progress = Progress(len(todo), sum(t.nbytes for t in todo), quiet=options.quiet)
    try:
        dashboard, peak = _execute(dsk, writes, finals, options, where, progress, log,
                                   lambda client: _check_cluster(client, where, plan, todo, out_dir, options))
    except KeyboardInterrupt:
        raise MergeflowError(f"interrupted; {out_dir} is not a complete model (no config.json). "
                             "Rerun the same command with --resume to continue") from None
    except MergeflowError as e:
        raise MergeflowError(f"{e}\nThe merge stopped; {out_dir} holds no config.json and is not a "
                             "model. Fix the cause and rerun with --resume to keep finished tensors") from None
    finished, _ = read_journal(out_dir, plan.fingerprint)
    check_complete(plan, out_dir, finished)
    publish(plan, out_dir)
    remove_state(out_dir)
    return RunSummary(out_dir, len(todo), len(plan.tensors) - len(todo),
                      sum(i.tensor.nbytes for t in todo for i in t.all_inputs()),
                      sum(t.nbytes for t in todo) + headers, time.monotonic() - started, peak, dashboard)


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


def _start(plan: MergePlan, out_dir: Path, resume: bool) -> tuple[set[str], int]:
    """The finished tensors still on disk (resume), recorded as the new journal before any
    shard is (re)created; then every shard prepared. Returns them and the header bytes written."""
    done: set[str] = set()
    if resume:
        done, rebooted = read_journal(out_dir, plan.fingerprint)
        if rebooted:
            warnings.warn(f"the machine restarted since the interrupted merge into {out_dir}; its "
                          "tensors may not have reached the disk, so all are merged again", stacklevel=3)
        done = on_disk(out_dir, plan.shards, done)
    start_journal(out_dir, plan.fingerprint, done)
    return done, _prepare_shards(plan, out_dir)


def _prepare_shards(plan: MergePlan, out_dir: Path) -> int:
    """Create (or keep, on resume) every shard with its header and its blocks reserved."""
    written = 0
    for shard in plan.shards:
        try:
            if not prepare_shard(out_dir / shard.file, shard):
                written += len(shard.header)
        except OSError as e:
            free = shutil.disk_usage(out_dir).free
            raise MergeflowError(
                f"cannot create {out_dir / shard.file} ({human_bytes(shard.size)}): {e.strerror or e}; "
                f"the merge writes {human_bytes(plan.bytes_written)} and {human_bytes(free)} is free "
                f"there. No tensor was read; free space or choose another output directory") from None
    return written


def _check_cluster(client, where: _Where, plan: MergePlan, todo: list[TensorPlan], out_dir: Path,
                   options: RunOptions) -> None:
    """An existing cluster's workers must see what this merge reads and writes."""
    if not where.address:
        return
    files = [i.tensor.file for t in todo for i in t.all_inputs()]
    files += [i.tensor.lora.file for t in todo for i in t.all_inputs() if i.tensor.lora is not None]
    writable = [str(out_dir / s.file) for s in plan.shards] + [str(journal_path(out_dir).parent)]
    cluster.check_workers(client, where.address, cluster.input_files(files), out_dir, writable,
                          options.device)


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


__all__ = ["RunOptions", "RunSummary", "run_merge", "journal_path"]
