"""Running on Dask clusters: multi-process and per-GPU local clusters, an existing cluster
reached by address (a real `dask scheduler` and two `dask worker` processes), the checks its
workers pass before the merge, and a worker killed mid-merge. Every merge here must equal
the sync scheduler's byte for byte.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mergeflow.cli import main
from mergeflow.errors import MergeflowError
from mergeflow.exec import budget, cluster, run
from mergeflow.exec.graph import build_graph
from mergeflow.exec.options import RunOptions
from mergeflow.methods import passes
from mergeflow.output.merge import run_merge
from mergeflow.plan import plan_merge
from mergeflow.spec.config import load_config
from mergeflow.testing import make_family

SHARD = "100KB"


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture
def reference(config, tmp_path) -> dict[str, bytes]:
    out = tmp_path / "reference"
    assert main(["run", str(config), str(out), "--scheduler", "sync", "--quiet", "--out-shard-size", SHARD]) == 0
    return snapshot(out)


def bounded(args: list[str], timeout: float = 120) -> int:
    """`mergeflow` (in this process, so monkeypatches apply) with a deadline: a merge on a
    cluster that hangs fails the test instead of the suite."""
    result: list = []
    worker = threading.Thread(target=lambda: result.append(main(args)), daemon=True)
    worker.start()
    worker.join(timeout)
    assert result, f"mergeflow {' '.join(args)} did not finish in {timeout} s"
    return result[0]


def plan_of(config: Path):
    return plan_merge(load_config(config), out_shard_size=100_000)


def listening() -> set[str]:
    """The addresses this process and its children listen on."""
    import psutil

    me = psutil.Process()
    return {c.laddr.ip for p in [me, *me.children(recursive=True)]
            for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}


def strangers(address: str) -> list:
    """What becomes of a client that lacks the run's credentials: a plain TCP connection
    to the scheduler's port, and TLS with credentials of its own."""
    from distributed import Client
    from distributed.comm import connect
    from distributed.security import Security

    seen = [address.rsplit(":", 1)[0]]
    attempts = [lambda: connect(address.replace("tls://", "tcp://"), timeout="3s"),
                lambda: Client(address, security=Security.temporary(), timeout="3s")]
    for attempt in attempts:
        try:
            result = attempt()
        except (OSError, TimeoutError, TypeError):
            seen.append("refused")
        else:
            if hasattr(result, "close"):  # a coroutine (connect) never got a reply either
                result.close()
            seen.append("connected" if not hasattr(result, "send") else "refused")
    return seen


def listeners() -> set[tuple[str, int]]:
    """(address, port) of every TCP socket this process and its children listen on."""
    import psutil

    me = psutil.Process()
    return {(c.laddr.ip, c.laddr.port) for p in [me, *me.children(recursive=True)]
            for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}


# ------------------------------------------------------------------ local clusters


@pytest.mark.parametrize("dashboard", ["127.0.0.1:0", None])
def test_the_in_process_cluster_listens_on_no_tcp_port_but_the_dashboard(config, tmp_path, monkeypatch,
                                                                         dashboard):
    """The default cluster talks over the in-process transport: during the merge the only
    TCP listener is the dashboard's (127.0.0.1), and without a dashboard there is none."""
    from mergeflow.exec import tasks

    seen = tmp_path / "listening"  # the task runs on a copy of this function (cloudpickle)
    real = tasks.finalize

    def look(*args):
        if not seen.exists():
            seen.write_text(json.dumps(sorted(listeners())))
        return real(*args)
    monkeypatch.setattr(tasks, "finalize", look)
    before = listeners()
    summary = run_merge(plan_of(config), tmp_path / "out", RunOptions(dashboard_address=dashboard, quiet=True))
    during = {tuple(x) for x in json.loads(seen.read_text())} - before
    if dashboard is None:
        assert during == set() and summary.dashboard is None
    else:
        port = int(summary.dashboard.rsplit(":", 1)[1].split("/")[0])
        assert during == {("127.0.0.1", port)}


@pytest.mark.cluster
def test_two_process_workers_equal_the_sync_merge(config, reference, tmp_path, monkeypatch):
    threads = {}
    real_setup = cluster.setup_workers

    def setup(client, **kwargs):
        real_setup(client, **kwargs)
        threads.update(client.run(torch.get_num_threads))
        threads["listening"] = listening()
        threads["strangers"] = strangers(client.scheduler.address)
    monkeypatch.setattr(cluster, "setup_workers", setup)
    options = RunOptions(processes=True, workers=2, threads_per_worker=2, quiet=True,
                         dashboard_address="127.0.0.1:0")
    summary = run_merge(plan_of(config), tmp_path / "out", options)
    assert snapshot(tmp_path / "out") == reference
    assert threads.pop("listening") == {"127.0.0.1"}  # scheduler, dashboard, nannies, workers
    # TLS with this run's credentials: a plain connection and one with other keys are refused
    assert threads.pop("strangers") == ["tls://127.0.0.1", "refused", "refused"]
    assert list(threads.values()) == [2, 2]  # the nanny's OMP_NUM_THREADS=1 overridden
    assert summary.tensors == 39 and summary.peak_rss > 50e6  # a worker that imported torch


@pytest.mark.cluster
def test_row_blocks_on_two_process_workers_equal_the_sync_merge(tmp_path, monkeypatch):
    """ties of a 2048 x 64 embedding in two row blocks of 1024 rows (a whole number of 512-row
    segments): the selection pass per block, its combine and the applies run on two process
    workers; the files equal one resident task per tensor on the sync scheduler."""
    models = make_family(tmp_path / "m", finetunes=["a", "b"], extra_vocab_rows=2048 - 384)
    config = tmp_path / "ties.yml"
    config.write_text(f"merge_method: ties\nbase_model: {models['base']}\nmodels:\n"
                      f"  - {{model: {models['a']}, parameters: {{weight: 0.6, density: 0.4}}}}\n"
                      f"  - {{model: {models['b']}, parameters: {{weight: 0.4, density: 0.5}}}}\n"
                      "dtype: float32\n")
    run_merge(plan_of(config), tmp_path / "whole", RunOptions(scheduler="sync", quiet=True))
    monkeypatch.setattr(budget, "BLOCK_ELEMENTS", 65536)
    monkeypatch.setattr(budget, "RESIDENT_WITHOUT_LIMIT", 0)
    dsk, _, _ = build_graph(plan_of(config), tmp_path / "out")
    embed = {k[3:] for k in dsk if k[0] == "reduce-ties" and k[2] == "model.embed_tokens.weight"}
    assert embed == {(0, 0), (0, 1), (0,), (1, 0), (1, 1), (1,)}  # float32: two radix passes
    options = RunOptions(processes=True, workers=2, threads_per_worker=1, quiet=True,
                         dashboard_address="127.0.0.1:0")
    run_merge(plan_of(config), tmp_path / "out", options)
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "whole")


@pytest.mark.cluster
def test_one_worker_per_gpu_wiring_runs_on_cpu(config, reference, tmp_path, monkeypatch):
    """Two fake GPUs: two process workers, each with its own CUDA_VISIBLE_DEVICES and one
    GPU resource; merge tasks ask for a GPU, the rest for nothing. The merge runs on CPU."""
    monkeypatch.setattr(cluster, "gpu_ids", lambda device: ["0", "1"])
    seen = {}
    real_connect, real_resources = cluster.connect, cluster.task_resources

    @contextlib.contextmanager
    def connect(*args):
        with real_connect(*args) as (client, link):
            seen["env"] = sorted(client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES")).values())
            seen["resources"] = [w["resources"] for w in client.scheduler_info(n_workers=-1)["workers"].values()]
            seen["address"] = client.scheduler.address
            yield client, link

    def resources(dsk, gpus):
        seen["annotate"] = real_resources(dsk, gpus)
        seen["keys"] = list(dsk)
        return seen["annotate"]
    monkeypatch.setattr(cluster, "connect", connect)
    monkeypatch.setattr(cluster, "task_resources", resources)
    run_merge(plan_of(config), tmp_path / "out", RunOptions(quiet=True, dashboard_address="127.0.0.1:0"))
    assert snapshot(tmp_path / "out") == reference
    assert seen["env"] == ["0", "1"] and seen["resources"] == [{"GPU": 1}, {"GPU": 1}]
    assert seen["address"].startswith("tls://127.0.0.1:")  # like --processes: TLS, this run's keys
    kinds = {k[0]: seen["annotate"](k) for k in seen["keys"]}
    assert kinds == {"merge-dare-ties": {"GPU": 1}, "finalize": {}}  # one task per tensor merges


def test_one_gpu_in_process_wiring_runs_on_cpu(config, reference, tmp_path, monkeypatch):
    """One fake GPU: the in-process worker offers one GPU resource and merges ask for it (one
    merge at a time on the device), finalize does not."""
    monkeypatch.setattr(cluster, "gpu_ids", lambda device: ["0"])
    seen = {}
    real_setup, real_resources = cluster.setup_workers, cluster.task_resources

    def setup(client, **kwargs):
        seen["resources"] = [w["resources"] for w in client.scheduler_info(n_workers=-1)["workers"].values()]
        return real_setup(client, **kwargs)

    def resources(dsk, gpus):
        annotate = real_resources(dsk, gpus)
        seen["groups"] = {k[0]: annotate(k) for k in dsk}
        return annotate
    monkeypatch.setattr(cluster, "setup_workers", setup)
    monkeypatch.setattr(cluster, "task_resources", resources)
    run_merge(plan_of(config), tmp_path / "out", RunOptions(quiet=True, dashboard_address="127.0.0.1:0"))
    assert snapshot(tmp_path / "out") == reference
    assert seen["resources"] == [{"GPU": 1}]
    assert seen["groups"] == {"merge-dare-ties": {"GPU": 1}, "finalize": {}}


def test_gpu_resources_go_to_merge_tasks_only(config, tmp_path, monkeypatch):
    plan = plan_of(config)
    dsk, _, _ = build_graph(plan, tmp_path)
    need = cluster.task_resources(dsk, ["0"])
    by_group = {}
    for key in dsk:
        by_group.setdefault(key[0], set()).add(tuple(sorted(need(key).items())))
    assert by_group == {"merge-dare-ties": {(("GPU", 1),)}, "finalize": {()}}
    # split tensors: reductions run on the CPU, the applies on the GPU, the commit anywhere
    monkeypatch.setattr(budget, "BLOCK_ELEMENTS", 4096)
    monkeypatch.setattr(passes, "SEGMENT", 1024)
    dsk, _, _ = build_graph(plan, tmp_path)
    need = cluster.task_resources(dsk, ["0"])
    split = {(k[0], len(k)): need(k) for k in dsk if k[0] != "finalize" and k[2] == "model.embed_tokens.weight"}
    assert split == {("reduce-dare-ties", 5): {}, ("reduce-dare-ties", 4): {},
                     ("merge-dare-ties", 4): {"GPU": 1}, ("merge-dare-ties", 3): {}}
    assert need(("something", "else")) == {} and need("x") == {}
    assert cluster.task_resources(dsk, []) is None


def test_local_clusters_use_every_core(monkeypatch):
    monkeypatch.setattr(cluster.os, "cpu_count", lambda: 8)
    assert cluster.local_sizes(RunOptions()) == (1, 8)  # in-process: one worker, a thread per core
    assert cluster.local_sizes(RunOptions(processes=True)) == (2, 4)  # a process worker per 4 cores
    assert cluster.local_sizes(RunOptions(processes=True, workers=8)) == (8, 1)
    assert cluster.local_sizes(RunOptions(workers=3, threads_per_worker=5)) == (3, 5)
    monkeypatch.setattr(cluster.os, "cpu_count", lambda: 2)
    assert cluster.local_sizes(RunOptions(processes=True)) == (1, 2)
    assert run.worker_budget(RunOptions(processes=True, memory_limit="1GB")).threads == 2  # the budget agrees


def test_a_cluster_without_workers_is_a_clear_error(monkeypatch):
    class NoWorkers:
        def scheduler_info(self, n_workers):
            return {"workers": {}}

        def wait_for_workers(self, n, timeout):
            raise TimeoutError
    monkeypatch.setattr(cluster, "WORKER_WAIT_S", 0)
    with pytest.raises(MergeflowError, match="the Dask scheduler at tcp://h:1 has no workers"):
        cluster.wait_for_workers(NoWorkers(), "tcp://h:1")


def test_gpu_workers_each_see_one_device(monkeypatch):
    specs = cluster.gpu_worker_specs(RunOptions(device="cuda", workers=3, threads_per_worker=2), ["4", "7"])
    opts = [s["options"] for s in specs.values()]
    assert [o["env"]["CUDA_VISIBLE_DEVICES"] for o in opts] == ["4", "7", "4"]
    assert all(o["resources"] == {"GPU": 1} and o["nthreads"] == 2 and o["host"] == "127.0.0.1" for o in opts)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert cluster.gpu_ids("cuda") == ["2", "3"]
    assert cluster.gpu_ids("cuda:1") == [] and cluster.gpu_ids("cpu") == []


def test_worker_plugin_sets_threads_and_leaves_ctrl_c_to_the_client():
    import signal

    worker = SimpleNamespace(state=SimpleNamespace(nthreads=3))
    before = torch.get_num_threads(), signal.getsignal(signal.SIGINT)
    plugin = cluster.TorchThreads(interrupt=False)
    plugin.setup(worker)
    try:
        assert torch.get_num_threads() == 3 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        plugin.teardown(worker)
    assert (torch.get_num_threads(), signal.getsignal(signal.SIGINT)) == before
    remote = cluster.TorchThreads()  # a shared cluster's workers keep their own Ctrl-C
    remote.setup(worker)
    try:
        assert signal.getsignal(signal.SIGINT) == before[1]
    finally:
        remote.teardown(worker)


@pytest.mark.parametrize("device, message", [("gpu", "not a device"), ("cpu:0", "not a device"),
                                             ("cuda:x", "not a device")])
def test_device_names_are_checked(device, message):
    with pytest.raises(MergeflowError, match=message):
        cluster.check_device(device)
    cluster.check_device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(config, tmp_path):
    with pytest.raises(MergeflowError, match="--device cuda: no CUDA device is available here"):
        run_merge(plan_of(config), tmp_path / "out", RunOptions(device="cuda", quiet=True))
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_merge_matches_cpu(config, tmp_path):
    from safetensors.torch import load_file

    for device in ("cpu", "cuda"):
        run_merge(plan_of(config), tmp_path / device, RunOptions(device=device, quiet=True))
    cpu, gpu = ({k: v for f in sorted((tmp_path / d).glob("*.safetensors")) for k, v in load_file(f).items()}
                for d in ("cpu", "cuda"))
    assert set(cpu) == set(gpu) and len(cpu) == 39
    for name, t in cpu.items():  # same masks (CPU generators); float rounding may differ by an ulp
        torch.testing.assert_close(gpu[name].float(), t.float(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("options, message", [
    (RunOptions(scheduler_address="tcp://127.0.0.1:1", workers=2, cli=True), "--workers: these size a local cluster"),
    (RunOptions(scheduler_address="tcp://127.0.0.1:1", workers=2), "workers: these size a local cluster"),
    (RunOptions(scheduler_address="tcp://127.0.0.1:1", scheduler="sync"), "scheduler_address runs on a Dask cluster; it cannot be combined with scheduler='sync'"),
    (RunOptions(scheduler="sync", processes=True, cli=True), "--processes: not used by --scheduler sync"),
    (RunOptions(scheduler="threads", workers=2), "workers: not used by scheduler='threads'"),
    (RunOptions(workers=0, cli=True), "--workers must be at least 1"),
    (RunOptions(workers=0), "workers must be at least 1"),
    (RunOptions(scheduler="dask"), "unknown scheduler"),
])
def test_conflicting_execution_options_are_refused(options, message):
    with pytest.raises(MergeflowError, match=f"^{message}"):
        run._where(options)


def test_unreachable_scheduler_is_a_clear_error(config, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", "1s")
    assert main(["run", str(config), str(tmp_path / "out"), "--quiet",
                 "--scheduler-address", "tcp://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in err
    assert f"The merge stopped; nothing was written to {tmp_path / 'out'}" in err
    assert not (tmp_path / "out").exists()


def test_force_with_an_unreachable_scheduler_leaves_the_old_model_alone(config, reference, tmp_path,
                                                                        capsys, monkeypatch):
    """--force replaces OUT only once the scheduler answers: the earlier model stays whole."""
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", "1s")
    out = tmp_path / "out"
    assert main(["run", str(config), str(out), "--quiet", "--out-shard-size", SHARD, "--scheduler", "sync"]) == 0
    before = snapshot(out)
    assert main(["run", str(config), str(out), "--quiet", "--force", "--out-shard-size", SHARD,
                 "--scheduler-address", "tcp://127.0.0.1:9"]) == 2
    assert "cannot reach the Dask scheduler" in capsys.readouterr().err
    assert snapshot(out) == before == reference and sorted(p.name for p in out.iterdir()) == sorted(before)


def test_worker_problems_name_what_is_missing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / (cluster.CHECK_FILE + "token")).write_text("token")
    present = tmp_path / "in.safetensors"
    present.write_bytes(b"12345")
    ok = cluster.worker_problems(cluster.__version__, {str(present): 5}, str(out), "token", [], "cpu")
    assert ok == []
    (out / (cluster.CHECK_FILE + "other-token")).write_text("token")  # another client's
    found = cluster.worker_problems("0.0.1", {str(present): 6, "/nowhere/x.safetensors": 1},
                                    str(out), "other-token", [], "cpu")
    assert found[0] == f"runs mergeflow {cluster.__version__}, the client runs 0.0.1"
    assert f"input {present} is 5 bytes here, 6 bytes on the client" in found
    assert "cannot see input /nowhere/x.safetensors (No such file or directory)" in found
    assert any(p.startswith(f"sees another directory at {out}") for p in found)
    missing = cluster.worker_problems(cluster.__version__, {}, str(tmp_path / "elsewhere"), "t", [], "cpu")
    assert missing[0].startswith(f"cannot see the output directory {tmp_path / 'elsewhere'}")


# ------------------------------------------------------------------ an existing cluster

HOOK = Path(__file__).with_name("_worker_hook.py")


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """A `dask scheduler` and two `dask worker` processes (nannies) on 127.0.0.1, random
    ports; workers preload tests/_worker_hook.py (one dies mid-write when armed)."""
    from distributed import Client

    where = tmp_path_factory.mktemp("dask")
    env = {**os.environ, "MF_KILL_ARM": str(where / "kill-one")}
    procs = []

    def start(name, *args):
        log = open(where / f"{name}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", *args], env=env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
        log.close()
    try:
        start("scheduler", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
              "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(where / "scheduler.json"),
              "--idle-timeout", "600")
        address = _wait_for_address(where / "scheduler.json", procs[0])
        for i in range(2):
            start(f"worker{i}", "distributed.cli.dask_worker", address, "--host", "127.0.0.1",
                  "--nthreads", "1", "--dashboard-address", "127.0.0.1:0", "--preload", str(HOOK),
                  "--name", f"w{i}", "--death-timeout", "60")
        with Client(address, timeout="20s") as client:
            client.wait_for_workers(2, timeout=90)
        yield SimpleNamespace(address=address, arm=where / "kill-one", logs=where)
    finally:  # workers first: a worker whose scheduler went away first lingers for seconds
        for group in (procs[1:], procs[:1]):
            for p in group:
                p.terminate()
            for p in group:
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, 9)
                    p.wait()


def _wait_for_address(path: Path, proc: subprocess.Popen) -> str:
    deadline = time.monotonic() + 60
    while True:
        if path.exists():
            try:
                return json.loads(path.read_text())["address"]
            except (ValueError, KeyError):
                pass
        assert proc.poll() is None, "the dask scheduler exited"
        assert time.monotonic() < deadline, "the dask scheduler did not start"
        time.sleep(0.05)


@pytest.mark.cluster
def test_merge_on_an_existing_cluster(dask_cluster, config, reference, tmp_path, capsys):
    out = tmp_path / "out"
    assert bounded(["run", str(config), str(out), "--scheduler-address", dask_cluster.address,
                 "--out-shard-size", SHARD]) == 0
    assert snapshot(out) == reference
    err = capsys.readouterr().err
    assert "39/39 tensors" in err and "merged 39 tensors" in err


@pytest.mark.cluster
def test_scheduler_address_from_the_environment(dask_cluster, config, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", dask_cluster.address)
    seen = []
    real = cluster.check_workers
    monkeypatch.setattr(cluster, "check_workers", lambda client, address, *a: (seen.append(address),
                                                                               real(client, address, *a)))
    assert bounded(["run", str(config), str(tmp_path / "out"), "--quiet", "--out-shard-size", SHARD]) == 0
    assert seen == [dask_cluster.address] and snapshot(tmp_path / "out") == reference


@pytest.mark.cluster
def test_workers_are_checked_before_the_merge(dask_cluster, config, tmp_path, monkeypatch, capsys):
    """A client of another mergeflow version, an input the workers cannot see: one error
    naming each worker and each problem, before any tensor is read."""
    real = cluster.input_files
    monkeypatch.setattr(cluster, "input_files", lambda files: {**real(files), "/nowhere/x.safetensors": 1})
    monkeypatch.setattr(cluster, "__version__", "0.0.1")
    out = tmp_path / "out"
    assert bounded(["run", str(config), str(out), "--quiet", "--scheduler-address", dask_cluster.address,
                    "--out-shard-size", SHARD]) == 2
    err = capsys.readouterr().err
    assert f"the cluster at {dask_cluster.address} cannot run this merge; no tensor was read" in err
    assert err.count("  - worker tcp://127.0.0.1:") == 4  # two problems on each of two workers
    assert err.count("cannot see input /nowhere/x.safetensors") == 2  # both workers
    assert err.count("the client runs 0.0.1") == 2
    assert not out.exists()  # no tensor read and nothing written: OUT was never there


@pytest.mark.cluster
def test_a_worker_killed_mid_write_does_not_fail_the_merge(dask_cluster, config, reference, tmp_path):
    """Armed, the first worker to write tears its write (half the bytes) and dies by
    SIGKILL; the scheduler reruns its tasks on the other worker, whose write of the same
    bytes at the same offset repairs the torn one."""
    dask_cluster.arm.touch()
    out = tmp_path / "out"
    assert bounded(["run", str(config), str(out), "--quiet", "--scheduler-address", dask_cluster.address,
                 "--out-shard-size", SHARD]) == 0
    assert not dask_cluster.arm.exists()
    assert Path(str(dask_cluster.arm) + ".killed").read_text().isdigit()  # a worker did die mid-write
    assert snapshot(out) == reference


# ------------------------------------------------------------------ run options


def test_sizes_are_bytes_or_text():
    assert RunOptions(memory_limit="4GB").memory_limit == 4_000_000_000
    assert RunOptions(memory_limit="4GiB").memory_limit == 4 * 2**30  # as Dask reads it
    assert RunOptions(memory_limit=300_000_000).memory_limit == 300_000_000
    assert RunOptions(memory_limit="auto").memory_limit == "auto"
    assert RunOptions().memory_limit is None
    assert RunOptions(dashboard_address="none").dashboard_address is None
    assert RunOptions(dashboard_address=" 127.0.0.1:0 ").dashboard_address == "127.0.0.1:0"


@pytest.mark.parametrize("options, message", [
    (dict(memory_limit="100MB"), "memory_limit 100MB: below the 250.00 MB a worker needs before its first "
                                 "tensor (Python, torch and Dask); give at least 250.00 MB, or no limit"),
    (dict(memory_limit="100MB", cli=True), "--memory-limit 100MB: below the 250.00 MB a worker needs"),
    (dict(memory_limit=-1), "memory_limit -1: below the 250.00 MB"),
    (dict(memory_limit="lots"), "memory_limit: not a size: 'lots' (examples: 5B, 500M, 4GB, 4GiB)"),
    (dict(memory_limit=2.5), "memory_limit: 2.5 is not a size"),
    (dict(dashboard_address="8787"), "dashboard_address='8787': not an address; give HOST:PORT like "
                                     "127.0.0.1:8787 (port 0: any free port), or dashboard_address='none'"),
    (dict(dashboard_address="h:x", cli=True), "--dashboard-address h:x: not an address"),
])
def test_bad_run_options_are_refused_in_the_callers_words(options, message):
    with pytest.raises(MergeflowError) as e:
        RunOptions(**options)
    assert str(e.value).startswith(message)


def test_a_memory_limit_below_the_minimum_exits_2(config, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(config), str(out), "--memory-limit", "200MB"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: --memory-limit 200MB: below the 250.00 MB a worker needs before its first tensor "
                   "(Python, torch and Dask); give at least 250.00 MB, or no limit\n")
    assert not out.exists()


def test_api_errors_name_run_options(config, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(MergeflowError, match=r"is not empty; force=True overwrites it, resume=True continues"):
        run_merge(plan_of(config), out, RunOptions(scheduler="sync", quiet=True))
    with pytest.raises(MergeflowError, match=r"holds no journal .*; force=True replaces its files"):
        run_merge(plan_of(config), out, RunOptions(scheduler="sync", quiet=True, resume=True))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
