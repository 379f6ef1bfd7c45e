"""Where a merge runs on Dask: the local cluster, an existing one, and what its workers need.

- `connect`: an in-process LocalCluster (the default), a multi-process one (`--processes`),
  one process worker per GPU (`--device cuda` with several GPUs, or with `--processes`), or
  the cluster at `--scheduler-address`. Local clusters listen on 127.0.0.1 only.
- `check_workers`: before any tensor is read, every worker of an existing cluster must run
  the same mergeflow version, see every input file as the client does and the same output
  directory (a token written by the client, read back by the worker), and CUDA if asked.
- `TorchThreads`: process workers start with OMP_NUM_THREADS=1 (the nanny); this plugin sets
  torch's threads to the worker's thread count and restores them when it is removed.
- `gpu_resources`: the annotation that keeps one merge at a time on each GPU.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distributed.diagnostics.plugin import WorkerPlugin

from mergeflow import __version__
from mergeflow.errors import MergeflowError
from mergeflow.exec import tasks
from mergeflow.exec.journal import STATE_DIR

if TYPE_CHECKING:
    from distributed import Client

    from mergeflow.exec.run import RunOptions

CHECK_FILE = "worker-check"
CONNECT_TIMEOUT = "10s"
WORKER_WAIT_S = 60  # how long an existing cluster may take to show its first worker
PLUGIN_NAME = "mergeflow-torch-threads"


def gpu_ids(device: str) -> list[str]:
    """The GPUs a `--device cuda` run may spread over (one worker each): CUDA_VISIBLE_DEVICES'
    entries, or 0..n-1. A pinned device (`cuda:1`) or the CPU: none."""
    if device != "cuda":
        return []
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
    return ids or [str(i) for i in range(torch.cuda.device_count())]


def check_device(device: str) -> None:
    """`cpu`, `cuda` or `cuda:N`, and (for cuda) a device this process can use."""
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise MergeflowError(f"--device {device}: not a device; use cpu, cuda or cuda:N")
    if kind == "cpu":
        return
    import torch

    if not torch.cuda.is_available():
        raise MergeflowError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise MergeflowError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s), numbered from 0")


def gpu_resources(gpu_keys: frozenset, key: Any) -> dict[str, int]:
    """Resources a task needs: one GPU for a merge (a fused task merges too), none for the
    rest. Dask calls this for every key, so it always returns a dict, never None."""
    return {"GPU": 1} if key in gpu_keys else {}


def task_resources(dsk: dict, gpus: list[str]):
    """The `resources=` annotation for client.get (None without GPUs): the tasks that run a
    merge kernel, whatever their key, need a GPU."""
    if not gpus:
        return None
    merging = (tasks.run_tensor, tasks.apply_block)
    return partial(gpu_resources, frozenset(k for k, t in dsk.items() if getattr(t, "func", None) in merging))


class TorchThreads(WorkerPlugin):
    """On a process worker: torch intra-op threads = the worker's thread count. On a local
    one (`interrupt=False`) also ignore SIGINT: a Ctrl-C reaches the whole process group, and
    the client, not each worker, stops the merge. Both restored when the plugin is removed."""

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self, interrupt: bool = True) -> None:
        self.interrupt = interrupt

    def setup(self, worker) -> None:
        import torch

        self.before = torch.get_num_threads()
        torch.set_num_threads(max(1, worker.state.nthreads))
        if not self.interrupt and threading.current_thread() is threading.main_thread():
            self.handler = signal.signal(signal.SIGINT, signal.SIG_IGN)

    def teardown(self, worker) -> None:
        import torch

        if hasattr(self, "before"):
            torch.set_num_threads(self.before)
        if hasattr(self, "handler") and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self.handler)


def connect(options: RunOptions, address: str | None, gpus: list[str]):
    """(cluster or None, client): the existing cluster at `address`, or a new local one."""
    from distributed import Client

    if address:
        try:
            return None, Client(address, timeout=CONNECT_TIMEOUT)
        except OSError as e:
            raise MergeflowError(f"cannot reach the Dask scheduler at {address}: {e}; check the address "
                                 "(tcp://host:8786) and that the scheduler is running") from None
    cluster = gpu_cluster(options, gpus) if _per_gpu(options, gpus) else local_cluster(options, gpus)
    return cluster, Client(cluster)


def _per_gpu(options: RunOptions, gpus: list[str]) -> bool:
    return len(gpus) > 1 or bool(gpus and options.processes)


def local_cluster(options: RunOptions, gpus: list[str]):
    """In-process (default: one worker, a thread per core) or `--processes` (default: one
    single-threaded worker per core). With a GPU, each worker offers one `GPU` resource."""
    from distributed import LocalCluster

    workers, threads = local_sizes(options)
    # loopback only; in-process (inproc comms) each worker's HTTP server would bind 0.0.0.0
    where = {"host": "127.0.0.1"} if options.processes else {"worker_dashboard_address": "127.0.0.1:0"}
    return LocalCluster(n_workers=workers, threads_per_worker=threads, processes=options.processes,
                        memory_limit=options.memory_limit or 0, dashboard_address=options.dashboard_address,
                        resources={"GPU": 1} if gpus else None, **where)


def local_sizes(options: RunOptions) -> tuple[int, int]:
    """(workers, threads per worker) of a local cluster: the cores divided among the workers."""
    cores = os.cpu_count() or 1
    workers = options.workers or (cores if options.processes else 1)
    return workers, options.threads_per_worker or max(1, cores // workers)


def gpu_cluster(options: RunOptions, gpus: list[str]):
    """One process worker per GPU (or `--workers N`, spread over the GPUs in turn), each
    seeing only its own device (CUDA_VISIBLE_DEVICES) and offering one `GPU` resource."""
    from distributed import Scheduler, SpecCluster

    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "protocol": "tcp://",
                                               "dashboard_address": options.dashboard_address}}
    return SpecCluster(workers=gpu_worker_specs(options, gpus), scheduler=scheduler, name="mergeflow",
                       silence_logs=logging.WARN)


def gpu_worker_specs(options: RunOptions, gpus: list[str]) -> dict[int, dict]:
    from distributed import Nanny

    count = options.workers or len(gpus)
    threads = options.threads_per_worker or max(1, (os.cpu_count() or 1) // count)
    return {i: {"cls": Nanny, "options": {
        "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0", "nthreads": threads, "silence_logs": logging.WARN,
        "memory_limit": options.memory_limit or 0, "resources": {"GPU": 1},
        "env": {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]}}} for i in range(count)}


def setup_workers(client: Client, *, remote: bool, processes: bool) -> None:
    """Torch threads on process workers (remote workers are processes too); local process
    workers leave Ctrl-C to the client."""
    if remote or processes:
        client.register_plugin(TorchThreads(interrupt=remote), name=PLUGIN_NAME)


def release_workers(client: Client, *, remote: bool) -> None:
    """Give a shared cluster's workers their torch threads back."""
    if remote:
        try:
            client.unregister_worker_plugin(PLUGIN_NAME)
        except Exception:  # the cluster is going away; nothing to restore
            pass


def wait_for_workers(client: Client, address: str) -> None:
    from distributed.utils import TimeoutError as DaskTimeout

    if client.scheduler_info(n_workers=-1).get("workers"):
        return
    try:
        client.wait_for_workers(1, timeout=WORKER_WAIT_S)
    except (TimeoutError, DaskTimeout):
        raise MergeflowError(f"the Dask scheduler at {address} has no workers (waited {WORKER_WAIT_S} s); "
                             "start some with `dask worker " + address + "`") from None


def input_files(files: Iterable[str]) -> dict[str, int]:
    """Each input file with its size as the client sees it."""
    return {f: os.stat(f).st_size for f in sorted(set(files))}


def check_workers(client: Client, address: str, files: dict[str, int], out_dir: Path,
                  writable: list[str], device: str) -> None:
    """Every worker runs this mergeflow, sees the inputs, the same output directory and
    (for cuda) a GPU; otherwise one error naming each worker and what it lacks."""
    wait_for_workers(client, address)
    token = secrets.token_hex(16)
    marker = out_dir / STATE_DIR / CHECK_FILE
    marker.write_text(token)
    results = client.run(worker_problems, __version__, files, str(out_dir), token, writable, device,
                         on_error="return")
    lines = []
    for worker, found in sorted(results.items()):
        if isinstance(found, BaseException):
            found = [f"cannot run mergeflow's check ({type(found).__name__}: {found}); install "
                     f"mergeflow {__version__} on every worker"]
        lines += [f"  - worker {worker}: {p}" for p in found[:5]]
        if len(found) > 5:
            lines.append(f"  - worker {worker}: ... and {len(found) - 5} more")
    if lines:
        raise MergeflowError(f"the cluster at {address} cannot run this merge; no tensor was read:\n"
                             + "\n".join(lines) + "\nEvery worker needs the same mergeflow version and the "
                             "input and output paths at the same absolute paths (a shared filesystem)")


def worker_problems(version: str, files: dict[str, int], out_dir: str, token: str,
                    writable: list[str], device: str) -> list[str]:
    """Run on a worker: what keeps it from taking part (empty: nothing)."""
    problems = []
    if __version__ != version:
        problems.append(f"runs mergeflow {__version__}, the client runs {version}")
    for path, size in files.items():
        try:
            here = os.stat(path).st_size
        except OSError as e:
            problems.append(f"cannot see input {path} ({e.strerror or e})")
            continue
        if here != size:
            problems.append(f"input {path} is {here} bytes here, {size} bytes on the client")
        elif not os.access(path, os.R_OK):
            problems.append(f"cannot read input {path}")
    problems += _output_problems(out_dir, token, writable)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            problems.append(f"has no CUDA device (--device {device})")
    return problems


def _output_problems(out_dir: str, token: str, writable: list[str]) -> list[str]:
    marker = Path(out_dir) / STATE_DIR / CHECK_FILE
    try:
        seen = marker.read_text()
    except OSError as e:
        return [f"cannot see the output directory {out_dir} ({e.strerror or e})"]
    if seen != token:
        return [f"sees another directory at {out_dir}, not the client's (a local disk, not a "
                "shared one?)"]
    return [f"cannot write {p}" for p in [out_dir, *writable] if not os.access(p, os.W_OK)]
