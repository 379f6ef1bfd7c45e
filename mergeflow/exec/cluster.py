"""Where a merge runs on Dask: the local cluster, an existing one, and what its workers need.

- `connect`: an in-process LocalCluster (the default), a multi-process one (`--processes`),
  one process worker per GPU (`--device cuda` with several GPUs, or with `--processes`), or
  the cluster at `--scheduler-address`. No local cluster can be reached by anyone else: the
  in-process one talks over the in-process transport (no socket at all), process workers
  over TLS on 127.0.0.1 with credentials made for the run (`Security.temporary`). Only the
  dashboard listens on TCP (127.0.0.1 by default; none with `dashboard_address=None`).
- `check_workers`: before any tensor is read, every worker of an existing cluster must run
  the same mergeflow version, see every input file as the client does and the same output
  directory (a token file the client makes, read back by the worker), and CUDA if asked.
- `TorchThreads`: process workers start with OMP_NUM_THREADS=1 (the nanny); this plugin sets
  torch's threads to the worker's thread count and restores them when it is removed.
- `gpu_resources`: the annotation that keeps one merge at a time on each GPU.
"""

from __future__ import annotations

import contextlib
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
from mergeflow.exec import budget, dashboard, tasks

if TYPE_CHECKING:
    from distributed import Client

    from mergeflow.exec.options import RunOptions

CHECK_FILE = ".mergeflow-check-"  # + a token: the file a worker must see in OUT
CONNECT_TIMEOUT = "10s"
WORKER_WAIT_S = 60  # how long an existing cluster may take to show its first worker
PLUGIN_NAME = "mergeflow-torch-threads"
CLOSE_TIMEOUT_S = 30  # a process worker finishing its last task before it stops


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
    """Resources a task needs: one GPU for a merge (a tensor's task or a block's apply), none for the
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


@contextlib.contextmanager
def connect(options: RunOptions, address: str | None, gpus: list[str]):
    """A client of the existing cluster at `address`, or of a new local cluster, as
    (client, dashboard link or None); both closed on exit. Nothing else is started or
    written before the scheduler answers."""
    from distributed import Client

    if address:
        try:
            client = Client(address, timeout=CONNECT_TIMEOUT)
        except (OSError, ValueError, TypeError) as e:
            raise MergeflowError(f"cannot reach the Dask scheduler at {address}: {e}; check the address "
                                 "(tcp://host:8786) and that the scheduler is running") from None
        try:
            yield client, client.dashboard_link
        finally:
            release_workers(client, remote=True)
            client.close()
        return
    with dashboard.groups_page() if options.dashboard_address else contextlib.nullcontext():
        cluster = _start(options, gpus)
        try:
            client = Client(cluster)
            try:
                link = _dashboard_link(cluster, client, options)
                yield client, link
            finally:
                client.close()
        finally:
            cluster.close(timeout=CLOSE_TIMEOUT_S)


def _start(options: RunOptions, gpus: list[str]):
    """The local cluster for `options`; one that cannot start (a dashboard address in use
    by something else, or not of this machine) is the user's to fix."""
    try:
        return gpu_cluster(options, gpus) if _per_gpu(options, gpus) else local_cluster(options, gpus)
    except (OSError, RuntimeError, ValueError) as e:
        cause = e.__cause__ or e
        if not options.dashboard_address:
            raise MergeflowError(f"cannot start the local Dask cluster ({type(cause).__name__}: {cause}); "
                                 f"{options.term('scheduler', 'threads')} runs without Dask's "
                                 "cluster") from None
        raise MergeflowError(f"cannot start the local Dask cluster ({type(cause).__name__}: {cause}); "
                             f"its dashboard was to listen on {options.dashboard_address}: give "
                             f"{options.term('dashboard_address', '127.0.0.1:0')} (any free port) or "
                             f"{options.term('dashboard_address', 'none')}") from None


def _dashboard_link(cluster, client: Client, options: RunOptions) -> str | None:
    """The dashboard's link. The HTTP servers distributed starts in this process besides it
    are stopped (the in-process worker's; the scheduler's too without a dashboard), so the
    in-process cluster listens on no TCP port but the dashboard's."""
    nodes = list(getattr(cluster, "workers", {}).values())
    if not options.dashboard_address:
        nodes.append(cluster.scheduler)
    for node in nodes:
        server = getattr(node, "http_server", None)  # a Nanny (process worker) has none here
        if server is not None:
            server.stop()
    if options.dashboard_address:
        return dashboard.local_link(client.dashboard_link, options.dashboard_address)
    return None


def _per_gpu(options: RunOptions, gpus: list[str]) -> bool:
    return len(gpus) > 1 or bool(gpus and options.processes)


def local_cluster(options: RunOptions, gpus: list[str]):
    """In-process (one worker) on the in-process transport, or `--processes` over TLS on
    127.0.0.1 with credentials made for this run; sized by `local_sizes`. With a GPU, each
    worker offers one `GPU` resource."""
    from distributed import LocalCluster

    workers, threads = local_sizes(options)
    if options.processes:  # TLS: no other local user can connect to what runs the merge
        where = {"host": "127.0.0.1", "protocol": "tls://", "security": _security()}
    else:  # inproc: the scheduler and its worker are reachable from this process only
        where = {"protocol": "inproc://", "worker_dashboard_address": "127.0.0.1:0"}
    return LocalCluster(n_workers=workers, threads_per_worker=threads, processes=options.processes,
                        memory_limit=options.memory_limit or 0, resources={"GPU": 1} if gpus else None,
                        silence_logs=logging.WARN, **_dashboard_options(options), **where)


def _dashboard_options(options: RunOptions) -> dict:
    """Where the scheduler's HTTP server listens: the dashboard address, or (no dashboard)
    a loopback port that `_dashboard_link` closes (distributed always starts the server;
    given no address it would listen on every interface)."""
    if options.dashboard_address:
        return {"dashboard_address": options.dashboard_address}
    return {"dashboard_address": "127.0.0.1:0", "scheduler_kwargs": {"dashboard": False}}


def _security():
    """Temporary TLS credentials (a CA, key and certificate in memory, made now): every
    connection to the cluster must present them."""
    from distributed.security import Security

    return Security.temporary()


def local_sizes(options: RunOptions) -> tuple[int, int]:
    """(workers, threads per worker) of a local cluster: budget.local_sizes of the options."""
    return budget.local_sizes(options.workers, options.threads_per_worker, options.processes)


def gpu_cluster(options: RunOptions, gpus: list[str]):
    """One process worker per GPU (or `--workers N`, spread over the GPUs in turn), each
    seeing only its own device (CUDA_VISIBLE_DEVICES) and offering one `GPU` resource; over
    TLS with credentials made for this run, like `--processes`."""
    from distributed import Scheduler, SpecCluster

    security = _security()
    dash = _dashboard_options(options)
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "protocol": "tls://", "security": security,
                                               "dashboard_address": dash["dashboard_address"],
                                               **dash.get("scheduler_kwargs", {})}}
    return SpecCluster(workers=gpu_worker_specs(options, gpus, security), scheduler=scheduler,
                       name="mergeflow", silence_logs=logging.WARN, security=security)


def gpu_worker_specs(options: RunOptions, gpus: list[str], security=None) -> dict[int, dict]:
    from distributed import Nanny

    count = options.workers or len(gpus)  # as run.worker_budget counts them
    threads = options.threads_per_worker or max(1, (os.cpu_count() or 1) // count)
    return {i: {"cls": Nanny, "options": {
        "host": "127.0.0.1", "protocol": "tls://", "security": security, "dashboard_address": "127.0.0.1:0",
        "nthreads": threads, "silence_logs": logging.WARN, "memory_limit": options.memory_limit or 0,
        "resources": {"GPU": 1}, "env": {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]}}}
        for i in range(count)}


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
    marker = out_dir / (CHECK_FILE + token)  # a new name: nothing of OUT's is touched
    fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, token.encode())
        os.close(fd)
        results = client.run(worker_problems, __version__, files, str(out_dir), token, writable, device,
                             on_error="return")
    finally:
        marker.unlink(missing_ok=True)
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
    marker = Path(out_dir) / (CHECK_FILE + token)
    try:
        seen = marker.read_text()
    except OSError as e:
        return [f"cannot see the output directory {out_dir} ({e.strerror or e})"]
    if seen != token:
        return [f"sees another directory at {out_dir}, not the client's (a local disk, not a "
                "shared one?)"]
    return [f"cannot write {p}" for p in [out_dir, *writable]
            if (p == out_dir or os.path.lexists(p)) and not os.access(p, os.W_OK)]
