"""Resume: a merge stopped mid-way (SIGKILL, Ctrl-C) and resumed equals an uninterrupted one.

The interrupted run is a real `mergeflow run` process (tests/_stop_after.py): it lets a fixed
number of tensor writes through, tears the next one (half its bytes), then blocks; the test
kills or interrupts it once it is blocked, so every run stops at the same place.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mergeflow.cli import main
from mergeflow.exec.journal import journal_path, on_disk, read_journal, record_done, start_journal
from mergeflow.plan import plan_merge
from mergeflow.spec.config import load_config

STOP_AFTER = 12  # tensors written before the stop (the tiny family has 39)
SHARD = "100KB"  # several output shards, so there is an index too


def run(config: Path, out: Path, *extra: str) -> int:
    return main(["run", str(config), str(out), "--quiet", "--out-shard-size", SHARD, *extra])


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture
def reference(config, tmp_path) -> dict[str, bytes]:
    assert run(config, tmp_path / "reference", "--scheduler", "sync") == 0
    files = snapshot(tmp_path / "reference")
    assert "model.safetensors.index.json" in files and "config.json" in files
    return files


def start_blocked(config: Path, out: Path, scheduler: str = "sync") -> subprocess.Popen:
    """Start `mergeflow run` and return once it blocks after STOP_AFTER writes."""
    stopped = out.parent / "stopped"
    env = {**os.environ, "MF_STOP_AFTER": str(STOP_AFTER), "MF_STOPPED": str(stopped)}
    cmd = [sys.executable, str(Path(__file__).with_name("_stop_after.py")), "run", str(config), str(out),
           "--quiet", "--out-shard-size", SHARD, "--scheduler", scheduler, "--dashboard-address", "127.0.0.1:0"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not stopped.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the merge never reached the stop: {proc.communicate()}")
        time.sleep(0.05)
    return proc


def stop_mid_merge(config: Path, out: Path, sig: int, scheduler: str) -> subprocess.CompletedProcess:
    """Start `mergeflow run`, wait until it blocks after STOP_AFTER writes, send `sig`."""
    proc = start_blocked(config, out, scheduler)
    try:
        proc.send_signal(sig)
        out_text, err_text = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out_text, err_text)


@pytest.mark.parametrize("sig, scheduler", [(signal.SIGKILL, "distributed"), (signal.SIGINT, "sync"),
                                            (signal.SIGINT, "distributed")],
                         ids=["sigkill-distributed", "ctrl-c-sync", "ctrl-c-distributed"])
def test_stopped_merge_resumes_to_identical_bytes(config, reference, tmp_path, sig, scheduler):
    out = tmp_path / "out"
    done = stop_mid_merge(config, out, sig, scheduler)
    if sig == signal.SIGKILL:
        assert done.returncode == -signal.SIGKILL
    else:  # Ctrl-C: 130, as README says, and how to go on
        assert done.returncode == 130, done.stderr
        assert done.stderr.startswith(f"interrupted: {out} holds no config.json and is not a complete "
                                      "model; rerun with --resume to continue"), done.stderr
        assert "Traceback" not in done.stderr
    left = {p.name for p in out.iterdir()}
    assert not left & {"config.json", "model.safetensors.index.json"}, left
    assert any(n.endswith(".safetensors") for n in left)
    finished, _ = read_journal(out, _plan(config).fingerprint)
    assert STOP_AFTER <= len(finished) < 39
    assert any(snapshot(out)[n] != reference[n] for n in left if n.endswith(".safetensors"))

    assert run(config, out, "--resume", "--scheduler", "sync") == 0
    assert snapshot(out) == reference
    assert not (out / ".mergeflow").exists()


def _plan(config: Path):
    return plan_merge(load_config(config), out_shard_size=100_000)


def test_changed_config_or_input_is_refused(config, family, tmp_path, capsys):
    out = tmp_path / "out"
    stop_mid_merge(config, out, signal.SIGKILL, "sync")
    changed = tmp_path / "changed.yml"
    changed.write_text(config.read_text().replace("weight: 0.6", "weight: 0.5"))
    assert run(changed, out, "--resume") == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "different config or different input files" in err
    weights = family["a"] / "model.safetensors"
    before = weights.stat()
    try:
        os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))  # a rewritten input
        assert run(config, out, "--resume") == 2
        assert "cannot resume" in capsys.readouterr().err
    finally:
        os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert not (out / "config.json").exists()


def test_damaged_shard_loses_its_journal_lines_before_it_is_recreated(config, reference, tmp_path):
    """A resume that finds a shard missing or with a broken header recreates it: its tensors
    are merged again, and the journal forgets them before the shard is touched."""
    out = tmp_path / "out"
    stop_mid_merge(config, out, signal.SIGKILL, "sync")
    plan = _plan(config)
    finished, _ = read_journal(out, plan.fingerprint)
    shard = next(s for s in plan.shards if set(s.tensors) & finished)
    with open(out / shard.file, "r+b") as f:
        f.seek(9)
        f.write(b"#")
    assert on_disk(out, plan.shards, finished) == finished - set(shard.tensors)
    assert run(config, out, "--resume", "--scheduler", "sync") == 0
    assert snapshot(out) == reference


def test_journal_trusts_whole_lines_of_this_boot_only(tmp_path, monkeypatch):
    import mergeflow.exec.journal as journal

    start_journal(tmp_path, "abc", {"x.weight"})
    path = journal_path(tmp_path)
    assert path.read_text().startswith("plan abc boot ")
    record_done(str(path), "y.weight")  # a part file per process, this one made by start_journal
    parts = list(path.parent.glob("journal-*"))
    assert [p.name for p in parts] == [f"journal-{socket.gethostname()}-{os.getpid()}"]
    assert parts[0].read_text() == f"part {socket.gethostname()} {os.getpid()}\ndone y.weight\n"
    (path.parent / "journal-otherhost-1").write_text("done z.weight\ndone w.wei")  # torn last line
    assert read_journal(tmp_path, "abc") == ({"x.weight", "y.weight", "z.weight"}, False)
    start_journal(tmp_path, "abc", {"y.weight"})  # a new run: one journal, its own part empty
    assert [p.read_text().startswith("part ") for p in path.parent.glob("journal-*")] == [True]
    assert read_journal(tmp_path, "abc") == ({"y.weight"}, False)
    monkeypatch.setattr(journal, "boot_id", lambda: "another-boot")
    assert read_journal(tmp_path, "abc") == (set(), True)
    assert read_journal(tmp_path / "nothing", "abc") == (set(), False)


def test_resume_after_a_reboot_merges_everything_again(config, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    stop_mid_merge(config, out, signal.SIGKILL, "sync")
    text = journal_path(out).read_text()
    head, _, rest = text.partition("\n")
    journal_path(out).write_text(head.rsplit(" ", 1)[0] + " 00000000-0000-0000-0000-000000000000\n" + rest)
    assert main(["run", str(config), str(out), "--out-shard-size", SHARD, "--resume",
                 "--scheduler", "sync"]) == 0
    err = capsys.readouterr().err
    assert "warning: the machine restarted" in err and "merged 39 tensors" in err
    assert snapshot(out) == reference


def test_killed_streamed_merge_resumes_to_identical_bytes(family, tmp_path):
    """linear streams (memory.streams): the torn write is a row chunk of a tensor that was not
    yet recorded as done, so the resumed run merges that tensor again, whole."""
    config = tmp_path / "linear.yml"
    config.write_text(f"merge_method: linear\nmodels:\n  - {{model: {family['a']}, parameters: {{weight: 0.3}}}}\n"
                      f"  - {{model: {family['b']}, parameters: {{weight: 0.7}}}}\ndtype: bfloat16\n")
    assert run(config, tmp_path / "reference", "--scheduler", "sync") == 0
    reference = snapshot(tmp_path / "reference")
    out = tmp_path / "out"
    assert stop_mid_merge(config, out, signal.SIGKILL, "distributed").returncode == -signal.SIGKILL
    finished, _ = read_journal(out, _plan(config).fingerprint)
    assert STOP_AFTER <= len(finished) < 39
    assert run(config, out, "--resume", "--scheduler", "sync") == 0
    assert snapshot(out) == reference


def test_resume_of_a_finished_merge_does_nothing(config, reference, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(config, out, "--scheduler", "sync") == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert main(["run", str(config), str(out), "--resume", "--out-shard-size", SHARD]) == 0
    err = capsys.readouterr().err
    assert err == f"{out} already holds this merge, finished (39 tensors, config.json and every shard " \
                  "as planned); nothing to do\n"
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps  # nothing rewritten
    assert snapshot(out) == reference


def test_resume_into_a_directory_without_a_journal_needs_force(config, family, reference, tmp_path, capsys):
    """An OUT that holds something else (here: another merge's files) is no interrupted
    merge: --resume refuses it and changes nothing; --resume --force merges over it."""
    out = tmp_path / "out"
    changed = tmp_path / "changed.yml"
    changed.write_text(config.read_text().replace("weight: 0.6", "weight: 0.5"))
    assert run(changed, out, "--scheduler", "sync") == 0
    before = snapshot(out)
    assert run(config, out, "--resume", "--scheduler", "sync") == 2
    err = capsys.readouterr().err
    assert f"error: output directory {out} holds no journal of an interrupted run" in err
    assert "--force replaces its files" in err and "Traceback" not in err
    assert snapshot(out) == before
    assert run(config, out, "--resume", "--force", "--scheduler", "sync") == 0
    assert snapshot(out) == reference


def test_ctrl_c_in_process_exits_130(config, tmp_path, monkeypatch, capsys):
    from mergeflow.exec import tasks

    def stop(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(tasks, "write_at", stop)
    out = tmp_path / "out"
    assert run(config, out, "--scheduler", "sync") == 130
    err = capsys.readouterr().err
    assert err == (f"interrupted: {out} holds no config.json and is not a complete model; rerun with "
                   "--resume to continue, keeping the finished tensors\n")


def test_a_second_run_on_the_same_output_is_refused(config, tmp_path, capsys):
    """While a merge holds OUT, a second one (even with --force) is refused and changes
    nothing there; the first then finishes as usual."""
    out = tmp_path / "out"
    first = start_blocked(config, out)
    try:
        before = snapshot(out)
        assert run(config, out, "--force", "--scheduler", "sync") == 2
        err = capsys.readouterr().err
        assert f"error: output directory {out} is in use: another mergeflow run is writing into it" in err
        assert snapshot(out) == before
    finally:
        first.kill()
        first.wait()
    assert run(config, out, "--resume", "--scheduler", "sync") == 0  # the lock went with the process
