"""Running on Dask clusters: multi-process and per-GPU local clusters, an existing cluster
reached by address (a real `dask scheduler` and two `dask worker` processes), the checks its
workers pass before the merge, and a worker killed mid-merge. Every merge here must equal
the sync scheduler's byte for byte.
"""

from __future__ import annotations

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
from mergeflow.exec.journal import STATE_DIR, read_journal
from mergeflow.exec.run import RunOptions
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


# ------------------------------------------------------------------ local clusters


@pytest.mark.cluster
def test_two_process_workers_equal_the_sync_merge(config, reference, tmp_path, monkeypatch):
    threads = {}
    real_setup = cluster.setup_workers

    def setup(client, **kwargs):
        real_setup(client, **kwargs)
        threads.update(client.run(torch.get_num_threads))
        threads["listening"] = listening()
    monkeypatch.setattr(cluster, "setup_workers", setup)
    options = RunOptions(processes=True, workers=2, threads_per_worker=2, quiet=True,
                         dashboard_address="127.0.0.1:0")
    summary = run_merge(plan_of(config), tmp_path / "out", options)
    assert snapshot(tmp_path / "out") == reference
    assert threads.pop("listening") == {"127.0.0.1"}  # scheduler, dashboard, nannies, workers
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

    def connect(*args):
        local, client = real_connect(*args)
        seen["env"] = sorted(client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES")).values())
        seen["resources"] = [w["resources"] for w in client.scheduler_info(n_workers=-1)["workers"].values()]
        return local, client

    def resources(dsk, gpus):
        seen["annotate"] = real_resources(dsk, gpus)
        seen["keys"] = list(dsk)
        return seen["annotate"]
    monkeypatch.setattr(cluster, "connect", connect)
    monkeypatch.setattr(cluster, "task_resources", resources)
    run_merge(plan_of(config), tmp_path / "out", RunOptions(quiet=True, dashboard_address="127.0.0.1:0"))
    assert snapshot(tmp_path / "out") == reference
    assert seen["env"] == ["0", "1"] and seen["resources"] == [{"GPU": 1}, {"GPU": 1}]
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
    assert cluster.local_sizes(RunOptions(processes=True)) == (8, 1)
    assert cluster.local_sizes(RunOptions(processes=True, workers=2)) == (2, 4)
    assert cluster.local_sizes(RunOptions(workers=3, threads_per_worker=5)) == (3, 5)


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
    (RunOptions(scheduler_address="tcp://127.0.0.1:1", workers=2), "--workers: these size a local cluster"),
    (RunOptions(scheduler_address="tcp://127.0.0.1:1", scheduler="sync"), "cannot be combined"),
    (RunOptions(scheduler="sync", processes=True), "--processes: not used by --scheduler sync"),
    (RunOptions(scheduler="threads", workers=2), "--workers: not used by --scheduler threads"),
    (RunOptions(workers=0), "--workers must be at least 1"),
    (RunOptions(scheduler="dask"), "unknown scheduler"),
])
def test_conflicting_execution_options_are_refused(options, message):
    with pytest.raises(MergeflowError, match=message):
        run._where(options)


def test_unreachable_scheduler_is_a_clear_error(config, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", "1s")
    assert main(["run", str(config), str(tmp_path / "out"), "--quiet",
                 "--scheduler-address", "tcp://127.0.0.1:9"]) == 2
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in capsys.readouterr().err


def test_worker_problems_name_what_is_missing(tmp_path):
    out = tmp_path / "out"
    (out / STATE_DIR).mkdir(parents=True)
    (out / STATE_DIR / cluster.CHECK_FILE).write_text("token")
    present = tmp_path / "in.safetensors"
    present.write_bytes(b"12345")
    ok = cluster.worker_problems(cluster.__version__, {str(present): 5}, str(out), "token", [], "cpu")
    assert ok == []
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
    assert not (out / "config.json").exists()
    assert read_journal(out, plan_of(config).fingerprint) == (set(), False)


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
