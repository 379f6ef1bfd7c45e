"""Monitoring: the Dask dashboard during a run (loopback, its link, task groups), the
terminal progress line, and the summary printed at the end."""

from __future__ import annotations

import io
import json
import urllib.request

import pytest

from mergeflow.cli import main
from mergeflow.exec import tasks
from mergeflow.exec.progress import Progress
from mergeflow.exec.run import RunOptions, _local_link
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
    assert _local_link(link, RunOptions(dashboard_address=address)) == expected


def test_progress_line_counts_tensors_bytes_rate_and_eta():
    out = io.StringIO()
    p = Progress(4, 4000, stream=out)
    p.started = 100.0
    p.done_tensors, p.done_bytes = 1, 1000
    # 1000 B in 10 s: 100 B/s; 3000 B left: 30 s; a quarter done: 6 of 24 marks
    assert p.line(now=110.0) == ("[######                  ] 1/4 tensors, 1.00 KB/4.00 KB written, "
                                 "100 B/s, ETA 0:30")


def test_progress_draws_every_5_s_off_a_terminal_unless_quiet(monkeypatch):
    import mergeflow.exec.progress

    clock = [1000.0]
    monkeypatch.setattr(mergeflow.exec.progress.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    p = Progress(3, 3000, stream=out)
    for step in (1.0, 1.0, 1.0):  # drawn at 1 s; not at 2 s (under 5 s later); the last always
        clock[0] += step
        p.advance(1000)
    lines = out.getvalue().splitlines()
    assert [line.split("] ")[1].split(" tensors")[0] for line in lines] == ["1/3", "3/3"]
    assert lines[-1] == "[########################] 3/3 tensors, 3.00 KB/3.00 KB written, 1.00 KB/s, ETA 0:00"
    quiet = io.StringIO()
    q = Progress(1, 10, quiet=True, stream=quiet)
    q.advance(10)
    assert quiet.getvalue() == "" and (q.done_tensors, q.done_bytes) == (1, 10)


def test_quiet_turns_the_progress_bar_off_but_not_the_summary(config, tmp_path, capsys):
    plan = plan_merge(load_config(config))
    assert main(["run", str(config), str(tmp_path / "loud"), "--scheduler", "sync"]) == 0
    loud = capsys.readouterr().err
    assert "] 39/39 tensors" in loud
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
