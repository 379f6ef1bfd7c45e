"""Monitoring: the Dask dashboard during a run (loopback, its link, task groups), the
terminal progress line, and the summary printed at the end."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mergeflow.cli import main
from mergeflow.exec import tasks
from mergeflow.exec.dashboard import layered, local_link
from mergeflow.exec.options import RunOptions
from mergeflow.exec.progress import Progress
from mergeflow.output.merge import run_merge
from mergeflow.plan import plan_merge
from mergeflow.spec.config import load_config


def _task_prefixes(dask_scheduler) -> list[str]:
    return sorted(dask_scheduler.task_prefixes)


def test_dashboard_answers_during_a_run(config, tmp_path, monkeypatch):
    """From inside a running task: the printed link answers HTTP 200 with the bokeh status
    page, and the scheduler's task groups are load, merge-<method>, write and finalize."""
    link_file, seen_file = tmp_path / "link", tmp_path / "seen.json"
    real = tasks.finalize

    def look(path, size, *written):  # runs on a copy of this function (cloudpickle): files only
        if not seen_file.exists():
            from distributed import get_client

            with urllib.request.urlopen(link_file.read_text(), timeout=30) as page:
                status, body = page.status, page.read().decode()
            seen_file.write_text(json.dumps({"status": status, "bokeh": "bokeh" in body.lower(),
                                             "prefixes": get_client().run_on_scheduler(_task_prefixes)}))
        return real(path, size, *written)
    monkeypatch.setattr(tasks, "finalize", look)

    def log(message: str) -> None:
        if message.startswith("dashboard: "):
            link_file.write_text(message.removeprefix("dashboard: "))
    summary = run_merge(plan_merge(load_config(config)), tmp_path / "out",
                        RunOptions(dashboard_address="127.0.0.1:0", quiet=True), log=log)
    link = link_file.read_text()
    assert link.startswith("http://127.0.0.1:") and link.endswith("/status") and summary.dashboard == link
    seen = json.loads(seen_file.read_text())
    assert seen["status"] == 200 and seen["bokeh"]
    assert seen["prefixes"] == ["finalize", "merge-dare-ties"]  # one task per tensor, then its shard


@pytest.mark.parametrize("link, address, expected", [
    ("http://192.0.2.2:8787/status", "127.0.0.1:8787", "http://127.0.0.1:8787/status"),
    ("http://192.0.2.2:40123/status", "localhost:0", "http://localhost:40123/status"),
    ("http://192.0.2.2:8787/status", "0.0.0.0:8787", "http://192.0.2.2:8787/status"),
    ("http://192.0.2.2:8787/status", ":8787", "http://192.0.2.2:8787/status"),
])
def test_dashboard_link_names_the_address_it_listens_on(link, address, expected):
    assert local_link(link, address) == expected


def test_groups_page_layout_puts_each_group_after_its_dependencies():
    """The dashboard's task groups as graph.py names them (lanes add load -> write): each
    group one column right of its rightmost dependency, a cycle broken at load."""
    deps = {"finalize": {"write"}, "write": {"merge-ties"}, "merge-ties": {"load"}, "load": set()}
    nodes, arrows = layered(deps)
    assert nodes == {"load": {"x": 0, "y": 0}, "merge-ties": {"x": 1, "y": 0},
                     "write": {"x": 2, "y": 0}, "finalize": {"x": 3, "y": 0}}
    assert arrows["write"] == {"nstart": {"merge-ties"}, "nend": ["write"]}
    cycle = {**deps, "load": {"write"}}  # loads that wait for an earlier write
    assert layered(cycle)[0] == nodes
    # two roots on their own rows; a group fed by both, on one row, moves up one
    two = {"a": set(), "b": set(), "c": {"a", "b"}, "d": {"a"}}
    assert layered(two)[0] == {"a": {"x": 0, "y": 0}, "b": {"x": 0, "y": 1}, "c": {"x": 1, "y": 1},
                               "d": {"x": 1, "y": 0}}
    assert layered({"x": set(), "y": set(), "z": {"x", "y"}})[0]["z"] == {"x": 1, "y": 1}
    same_row = {"r": set(), "p": {"r"}, "q": {"r"}, "s": {"p", "q"}}  # p, q: (1,0), (1,1)
    assert layered(same_row)[0]["s"] == {"x": 2, "y": 1}


@pytest.mark.parametrize("address, message", [
    ("nonsense", "--dashboard-address nonsense: not an address; give HOST:PORT"),
    ("127.0.0.1:99999", "--dashboard-address 127.0.0.1:99999: not an address"),
    ("192.0.2.77:0", "cannot start the local Dask cluster"),  # not an address of this machine
])
def test_a_bad_dashboard_address_is_a_user_error(config, tmp_path, capsys, address, message):
    out = tmp_path / "out"
    assert main(["run", str(config), str(out), "--quiet", "--dashboard-address", address]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and "Traceback" not in err, err
    assert "--dashboard-address none" in err and not out.exists()


def test_no_dashboard_prints_no_link(config, tmp_path, capsys):
    for i, flags in enumerate((["--no-dashboard"], ["--dashboard-address", "none"])):
        out = tmp_path / f"out{i}"
        assert main(["run", str(config), str(out), *flags]) == 0
        err = capsys.readouterr().err
        assert "dashboard: " not in err and "merged 39 tensors" in err


def test_progress_line_counts_tensors_bytes_rate_and_eta():
    p = Progress(4, 4000, stream=io.StringIO(), tty=False)
    p.started = 100.0
    p.done_tensors, p.done_bytes = 1, 1000
    # 1000 B in 10 s: 100 B/s; 3000 B left: 30 s; a quarter done: 6 of 24 marks
    assert p.line(now=110.0) == ("merging  25%|######                  | 1/4 tensors, 1.00kB/4.00kB, "
                                 "100B/s, ETA 00:30")


def test_progress_off_a_terminal_prints_a_line_every_5_s_and_the_last(monkeypatch):
    import mergeflow.exec.progress

    clock = [1000.0]
    monkeypatch.setattr(mergeflow.exec.progress.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    p = Progress(4, 4000, stream=out, tty=False)
    p.start()
    for step in (1.0, 1.0, 5.0, 1.0):  # drawn at 1 s; not at 2 s (1 s later); at 7 s; the last
        clock[0] += step
        p.advance(1000)
    p.close()
    lines = out.getvalue().splitlines()
    assert [line.split("| ")[1].split(" tensors")[0] for line in lines] == ["1/4", "3/4", "4/4"]
    assert lines[-1] == "merging 100%|########################| 4/4 tensors, 4.00kB/4.00kB, 500B/s, ETA 00:00"
    assert "\r" not in out.getvalue()
    quiet = io.StringIO()
    q = Progress(1, 10, quiet=True, stream=quiet, tty=True)
    q.start()
    q.advance(10)
    q.close()
    assert quiet.getvalue() == "" and (q.done_tensors, q.done_bytes) == (1, 10)


def test_quiet_turns_the_progress_bar_off_but_not_the_summary(config, tmp_path, capsys):
    plan = plan_merge(load_config(config))
    assert main(["run", str(config), str(tmp_path / "loud"), "--scheduler", "sync"]) == 0
    loud = capsys.readouterr().err
    assert "| 39/39 tensors" in loud
    assert main(["run", str(config), str(tmp_path / "quiet"), "--scheduler", "sync", "--quiet"]) == 0
    quiet = capsys.readouterr().err
    assert "tensors, " not in quiet and quiet.startswith(f"merged 39 tensors into {tmp_path / 'quiet'} in ")
    assert f"({plan.bytes_read / 1e6:.2f} MB read, {plan.bytes_written / 1e3:.2f} KB written" in quiet
    assert "peak worker memory" in quiet


def test_summary_counts_this_runs_work(config, tmp_path):
    plan = plan_merge(load_config(config))
    full = run_merge(plan, tmp_path / "out", RunOptions(scheduler="sync", quiet=True))
    assert (full.tensors, full.skipped) == (39, 0)
    assert (full.bytes_read, full.bytes_written) == (plan.bytes_read, plan.bytes_written)
    assert full.peak_rss > 50e6 and full.dashboard is None
    # the same run again over its own output (--force): the same work, the same bytes
    again = run_merge(plan, tmp_path / "out", RunOptions(scheduler="sync", quiet=True, force=True))
    assert (again.tensors, again.bytes_read, again.bytes_written) == (39, plan.bytes_read, plan.bytes_written)


# ---------------------------------------------------------------- what a terminal shows

SLOW = Path(__file__).with_name("_slow_run.py")


def _env(delay: float) -> dict[str, str]:
    return {**os.environ, "MF_SLOW": str(delay), "PYTHONPATH": str(Path(__file__).parents[2])}


def _open_tab(base: str, page: str) -> str:
    """Open a dashboard page and its bokeh websocket as a browser tab does, then drop the
    connection without a goodbye (a closed tab). Returns the websocket's status line."""
    host, port = base.split("//")[1].split(":")
    with urllib.request.urlopen(f"{base}/{page}", timeout=30) as r:
        body = r.read().decode()
    token = re.search(r'"token"\s*:\s*"([^"]+)"', body) or re.search(r'token&quot;:&quot;([^&]+)&', body)
    assert token, body[:300]
    sock = socket.create_connection((host, int(port)), timeout=30)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /{page}/ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                  f"Sec-WebSocket-Protocol: bokeh, {token.group(1)}\r\nOrigin: {base}\r\n\r\n").encode())
    status = sock.recv(4096).split(b"\r\n")[0].decode()
    time.sleep(0.5)  # the server sends its first messages
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset, no close frame
    sock.close()
    return status


def test_dashboard_pages_write_nothing_to_the_terminal(config, tmp_path):
    """During a run: the Groups pages answer 200, an individual-progress tab opens (a bokeh
    client, then a raw websocket dropped like a closed tab); the terminal shows no
    traceback and no log line, only mergeflow's own lines."""
    from bokeh.client import pull_session

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(SLOW), "run", str(config), str(out), "--dashboard-address",
                             "127.0.0.1:0"], env=_env(0.25), stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
        assert first.startswith("dashboard: http://127.0.0.1:"), first
        base = first.split()[1].rsplit("/", 1)[0]
        pages = {}
        for page in ("groups", "individual-groups", "status"):
            with urllib.request.urlopen(f"{base}/{page}", timeout=30) as r:
                pages[page] = r.status
        session = pull_session(url=f"{base}/individual-progress")
        time.sleep(0.5)
        session.close()
        tab = _open_tab(base, "individual-progress")
        rest = proc.stderr.read()
        assert proc.wait(timeout=120) == 0, rest
    finally:
        if proc.poll() is None:
            proc.kill()
    assert pages == {"groups": 200, "individual-groups": 200, "status": 200}
    assert tab == "HTTP/1.1 101 Switching Protocols"
    lines = rest.splitlines()
    assert all(line.startswith(("merging ", "merged 39 tensors")) for line in lines), rest
    assert "Traceback" not in rest and not (out / ".mergeflow").exists()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_the_bar_stays_on_one_line_of_an_80_column_terminal(config, tmp_path):
    """`mergeflow run` in a terminal 80 columns wide (tmux): every screen during the run
    shows one bar line, at most 80 wide; at the end the scrollback holds the dashboard
    link, one bar line (its last state) and the summary."""
    out, sock = tmp_path / "out", f"mergeflow-test-{os.getpid()}"
    command = (f"{sys.executable} {SLOW} run {config} {out} --dashboard-address 127.0.0.1:0; "
               "echo EXIT=$?; sleep 60")
    tmux = ["tmux", "-L", sock]
    subprocess.run([*tmux, "-f", "/dev/null", "new-session", "-d", "-x", "80", "-y", "24", "-s", "run",
                    "env " + " ".join(f"{k}={v}" for k, v in _env(0.15).items()
                                      if k in ("MF_SLOW", "PYTHONPATH", "PATH")) + " " + command],
                   check=True, timeout=30)
    try:
        screens = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            screen = subprocess.run([*tmux, "capture-pane", "-p", "-t", "run"], capture_output=True,
                                    text=True, timeout=30).stdout
            screens.append(screen)
            if "EXIT=" in screen:
                break
            time.sleep(0.3)
        history = subprocess.run([*tmux, "capture-pane", "-p", "-S", "-", "-t", "run"], capture_output=True,
                                 text=True, timeout=30).stdout
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=30)
    assert "EXIT=0" in history, history
    during = [s for s in screens if "merging " in s and "EXIT=" not in s]
    assert during, screens  # the bar was seen while the merge ran
    for screen in during:
        bars = [line for line in screen.splitlines() if "merging " in line]
        assert len(bars) == 1 and len(bars[0]) <= 80 and "tensors, " in bars[0], screen
    lines = [line for line in history.splitlines() if line.strip()]
    assert lines[0].startswith("dashboard: http://127.0.0.1:")
    bars = [line for line in lines if line.startswith("merging ")]
    assert len(bars) == 1 and bars[0].startswith("merging 100%|") and "| 39/39 tensors, " in bars[0], history
    assert len(bars[0]) <= 80 and bars[0].endswith("ETA 00:00")
    summary = history[history.index("merged 39 tensors"):history.index("EXIT=")]
    assert summary.replace("\n", "").startswith(f"merged 39 tensors into {out} in ")
