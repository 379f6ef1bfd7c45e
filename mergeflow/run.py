"""Run a MergePlan: prepare the output, pick the scheduler, run the graph, write metadata last.

Schedulers: "distributed" (default: an in-process LocalCluster with the dashboard, or a
multi-process one with --processes, or an existing cluster at --scheduler-address),
"threads" (dask's threaded scheduler) and "sync" (one thread, for debugging).
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import dask

from mergeflow.errors import MergeflowError
from mergeflow.graph import build_graph
from mergeflow.io.shards import prepare_shard
from mergeflow.journal import journal_path, open_journal
from mergeflow.output import check_complete, prepare_output, publish, remove_state
from mergeflow.plan import MergePlan
from mergeflow.progress import Progress, human_bytes


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
    tensors: int
    skipped: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss: int
    dashboard: str | None = None

    def text(self) -> str:
        rate = self.bytes_written / self.seconds if self.seconds else 0
        return (f"merged {self.tensors} tensors into {self.out_dir} in {self.seconds:.1f} s "
                f"({human_bytes(self.bytes_read)} read, {human_bytes(self.bytes_written)} written, "
                f"{human_bytes(rate)}/s; peak worker memory {human_bytes(self.peak_rss)})"
                + (f"; {self.skipped} tensors were already done" if self.skipped else ""))


def run_merge(plan: MergePlan, out_dir: str | Path, options: RunOptions | None = None,
              log=None) -> RunSummary:
    options = options or RunOptions()
    log = log or (lambda msg: None if options.quiet else print(msg, file=sys.stderr, flush=True))
    out_dir = Path(out_dir).resolve()
    started = time.monotonic()
    prepare_output(plan, out_dir, force=options.force, resume=options.resume)
    done = _prepare_shards(plan, out_dir, open_journal(out_dir, plan.fingerprint, options.resume))
    fuse = options.processes or bool(options.scheduler_address)
    dsk, writes, finals = build_graph(plan, out_dir, device=options.device, skip=done, fuse=fuse)
    todo = [t for t in plan.tensors if t.name not in done]
    progress = Progress(len(todo), sum(t.nbytes for t in todo), quiet=options.quiet)
    try:
        dashboard, peak = _execute(dsk, writes, finals, options, progress, log)
    except KeyboardInterrupt:
        raise MergeflowError(f"interrupted; {out_dir} is not a complete model (no config.json). "
                             "Rerun the same command with --resume to continue") from None
    except MergeflowError as e:
        raise MergeflowError(f"{e}\nThe merge stopped; {out_dir} holds no config.json and is not a "
                             "model. Fix the cause and rerun with --resume to keep finished tensors") from None
    finished = open_journal(out_dir, plan.fingerprint, resume=True)
    check_complete(plan, out_dir, finished)
    publish(plan, out_dir)
    remove_state(out_dir)
    return RunSummary(out_dir, len(plan.tensors), len(plan.tensors) - len(todo), plan.bytes_read,
                      plan.bytes_written, time.monotonic() - started, peak, dashboard)


def _prepare_shards(plan: MergePlan, out_dir: Path, done: set[str]) -> set[str]:
    """Create (or keep, on resume) every shard with its header and its blocks reserved;
    return the finished tensors that are still on disk."""
    for shard in plan.shards:
        try:
            if not prepare_shard(out_dir / shard.file, shard):  # recreated: its tensors are gone
                done -= set(shard.tensors)
        except OSError as e:
            free = shutil.disk_usage(out_dir).free
            raise MergeflowError(
                f"cannot create {out_dir / shard.file} ({human_bytes(shard.size)}): {e.strerror or e}; "
                f"the merge writes {human_bytes(plan.bytes_written)} and {human_bytes(free)} is free "
                f"there. No tensor was read; free space or choose another output directory") from None
    return done


def _execute(dsk, writes, finals, options: RunOptions, progress: Progress, log):
    if options.scheduler in ("sync", "threads") and not options.scheduler_address:
        _run_local(dsk, finals, options, progress)
        return None, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return _run_distributed(dsk, writes, finals, options, progress, log)


def _run_local(dsk, finals, options: RunOptions, progress: Progress) -> None:
    from dask.callbacks import Callback

    class Hook(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            if isinstance(key, tuple) and key[0] == "write":
                progress.advance(result)

    if options.scheduler == "sync":
        from dask.local import get_sync

        get_sync(dsk, finals, callbacks=[Hook()._callback])
    else:
        from dask.threaded import get

        get(dsk, finals, num_workers=options.threads_per_worker or os.cpu_count(), callbacks=[Hook()._callback])


def _run_distributed(dsk, writes, finals, options: RunOptions, progress: Progress, log):
    from distributed import Client, as_completed

    with dask.config.set({"distributed.worker.memory.spill": False,
                          "distributed.worker.memory.target": False,
                          "distributed.scheduler.worker-saturation": 1.1}):
        cluster, client = _client(options)
        try:
            dashboard = _local_link(client.dashboard_link, options) if cluster is not None else None
            if dashboard:
                log(f"dashboard: {dashboard}")
            futures = client.get(dsk, writes + finals, sync=False)
            for fut in as_completed(futures[: len(writes)]):
                progress.advance(fut.result())
            client.gather(futures[len(writes):])
            peak = max(client.run(_peak_rss).values(), default=0)
            return dashboard, peak
        finally:
            client.close()
            if cluster is not None:
                cluster.close()


def _client(options: RunOptions):
    from distributed import Client, LocalCluster

    address = options.scheduler_address or os.environ.get("DASK_SCHEDULER_ADDRESS")
    if address:
        try:
            return None, Client(address, timeout="10s")
        except OSError as e:
            raise MergeflowError(f"cannot reach the Dask scheduler at {address}: {e}") from None
    cores = os.cpu_count() or 1
    workers = options.workers or (cores if options.processes else 1)
    threads = options.threads_per_worker or (1 if options.processes else cores)
    # loopback only; in-process (inproc comms) each worker's HTTP server would bind 0.0.0.0
    where = {"host": "127.0.0.1"} if options.processes else {"worker_dashboard_address": "127.0.0.1:0"}
    cluster = LocalCluster(n_workers=workers, threads_per_worker=threads, processes=options.processes,
                           memory_limit=options.memory_limit or 0,
                           dashboard_address=options.dashboard_address, **where)
    return cluster, Client(cluster)


def _local_link(link: str, options: RunOptions) -> str:
    """The dashboard link with the host it listens on (dask names the machine's address)."""
    host = options.dashboard_address.rpartition(":")[0]
    if not host or host in ("0.0.0.0", "::", "[::]"):
        return link
    scheme, _, rest = link.partition("://")
    return f"{scheme}://{host}:{rest.partition(':')[2]}" if ":" in rest else link


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


__all__ = ["RunOptions", "RunSummary", "run_merge", "journal_path"]
