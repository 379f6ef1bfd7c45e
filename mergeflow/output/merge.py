"""Run a MergePlan into an output directory (run_merge): check it, lock it, run the graph
once the scheduler is up, then write the metadata, config.json last.

Nothing in OUT is changed before every check passed, the scheduler's connection and an
existing cluster's workers included (output/prepare.py). On resume the journal is rewritten
to what is really on disk before any shard is (re)created, then only the missing tensors
are merged (exec/journal.py).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from mergeflow.errors import MergeflowError
from mergeflow.exec import cluster
from mergeflow.exec.graph import build_graph
from mergeflow.exec.journal import LOG_FILE, STATE_DIR, read_journal
from mergeflow.exec.options import RunOptions
from mergeflow.exec.progress import Progress
from mergeflow.exec.run import _execute, _Where, _where, worker_budget
from mergeflow.output.metadata import check_complete, publish, remove_state
from mergeflow.output.prepare import OutputState, check_output, lock_output, prepare_output
from mergeflow.plan import MergePlan, TensorPlan
from mergeflow.spec.sizes import human_bytes


class MergeInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped the merge; the message says how to continue. A
    KeyboardInterrupt, so code that stops on those stops on this too (the CLI exits 130)."""


@dataclass(frozen=True)
class RunSummary:
    """What a run did: tensors merged now and skipped (done before), bytes, time, memory."""

    out_dir: Path
    tensors: int  # merged by this run
    skipped: int  # already done by an interrupted run (resume), or all of them (finished)
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss: int  # the largest peak RSS of one worker (mmapped input pages count)
    dashboard: str | None = None
    finished_before: bool = False  # OUT already held this merge: nothing was done

    def text(self) -> str:
        if self.finished_before:
            return (f"{self.out_dir} already holds this merge, finished ({self.skipped} tensors, "
                    "config.json and every shard as planned); nothing to do")
        rate = self.bytes_written / self.seconds if self.seconds else 0
        return (f"merged {self.tensors} tensors into {self.out_dir} in {self.seconds:.1f} s "
                f"({human_bytes(self.bytes_read)} read, {human_bytes(self.bytes_written)} written, "
                f"{human_bytes(rate)}/s; peak worker memory {human_bytes(self.peak_rss)})"
                + (f"; {self.skipped} tensors were already done" if self.skipped else ""))


def run_merge(plan: MergePlan, out_dir: str | Path, options: RunOptions | None = None,
              log=None) -> RunSummary:
    """Merge `plan` (from plan_merge) into the directory `out_dir` and return a RunSummary.

    `options` (RunOptions) choose the scheduler, workers, memory limit, device, dashboard,
    and whether a non-empty `out_dir` may be overwritten (`force`) or an interrupted merge
    in it continued (`resume`; on an `out_dir` that already holds this merge, finished, it
    does nothing). `log(message)` receives the few lines meant for the user (the dashboard
    link); by default they go to stderr unless `options.quiet`. The progress bar goes to
    stderr unless `options.quiet`.

    Raises MergeflowError for anything the caller can fix (an output directory that
    overlaps an input, is not empty, is used by another run; a cluster that cannot run the
    merge; a tensor that came out NaN), with nothing in `out_dir` that looks complete, and
    MergeInterrupted on Ctrl-C (rerun with `resume` to continue). The output directory is
    locked for the whole run; config.json is written last.
    """
    options = options or RunOptions()
    out_dir = Path(out_dir).resolve()
    started = time.monotonic()
    where = _where(options)
    check_output(plan, out_dir, options)  # before anything is made, OUT itself included
    with lock_output(out_dir):
        state = check_output(plan, out_dir, options)  # again, now that no other run can change it
        if state.finished:
            return RunSummary(out_dir, 0, len(plan.tensors), 0, 0, time.monotonic() - started, 0,
                              finished_before=True)
        if state.rebooted:
            warnings.warn(f"the machine restarted since the interrupted merge into {out_dir}; its "
                          "tensors may not have reached the disk, so all are merged again", stacklevel=2)
        return _run(plan, out_dir, options, where, state, log, started)


def _run(plan: MergePlan, out_dir: Path, options: RunOptions, where: _Where, state: OutputState,
         log, started: float) -> RunSummary:
    dsk, writes, finals = build_graph(plan, out_dir, device=options.device, skip=state.done,
                                      budget=worker_budget(options, where))
    todo = [t for t in plan.tensors if t.name not in state.done]
    progress = Progress(len(todo), sum(t.nbytes for t in todo), quiet=options.quiet)
    log = log or (lambda msg: None if options.quiet else progress.write(msg))
    headers: list[int] = []

    def ready(client) -> None:  # the scheduler is up: its last checks, then the first writes
        _check_cluster(client, where, plan, todo, out_dir, options.device)
        headers.append(prepare_output(plan, out_dir, state))

    try:
        dashboard, peak = _execute(dsk, writes, finals, options, where, progress, log, ready)
    except KeyboardInterrupt:
        raise MergeInterrupted(_unfinished(out_dir, headers, options)) from None
    except MergeflowError as e:
        raise MergeflowError(f"{e}\nThe merge stopped; {_unfinished(out_dir, headers, options)}") from None
    finished, _ = read_journal(out_dir, plan.fingerprint)
    check_complete(plan, out_dir, finished)
    publish(plan, out_dir, options)
    remove_state(out_dir)
    return RunSummary(out_dir, len(todo), len(plan.tensors) - len(todo),
                      sum(i.tensor.nbytes for t in todo for i in t.all_inputs()),
                      sum(t.nbytes for t in todo) + sum(headers), time.monotonic() - started, peak, dashboard)


def _unfinished(out_dir: Path, headers: list[int], options: RunOptions) -> str:
    """What an unfinished run left in OUT, and how to go on."""
    if not headers:  # stopped before its first write
        return f"nothing was written to {out_dir}"
    log = out_dir / STATE_DIR / LOG_FILE
    logged = f" (Dask's log: {log})" if log.is_file() and log.stat().st_size else ""
    return (f"{out_dir} holds no config.json and is not a complete model; rerun with "
            f"{options.term('resume')} to continue, keeping the finished tensors{logged}")


def _check_cluster(client, where: _Where, plan: MergePlan, todo: list[TensorPlan], out_dir: Path,
                   device: str) -> None:
    """An existing cluster's workers must see what this merge reads and writes."""
    if not where.address or client is None:
        return
    files = [i.tensor.file for t in todo for i in t.all_inputs()]
    files += [i.tensor.lora.file for t in todo for i in t.all_inputs() if i.tensor.lora is not None]
    writable = [str(out_dir / s.file) for s in plan.shards] + [str(out_dir / STATE_DIR)]
    cluster.check_workers(client, where.address, cluster.input_files(files), out_dir, writable, device)


__all__ = ["MergeInterrupted", "RunOptions", "RunSummary", "run_merge"]
