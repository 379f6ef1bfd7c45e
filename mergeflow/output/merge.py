"""Run a MergePlan into an output directory: prepare it, run the graph, write metadata last.

Resume: the journal is rewritten to what is really on disk before any shard is
(re)created, then only the missing tensors are merged (exec/journal.py).
"""

from __future__ import annotations

import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from mergeflow.errors import MergeflowError
from mergeflow.exec import cluster
from mergeflow.exec.budget import budget_for
from mergeflow.exec.graph import build_graph
from mergeflow.exec.journal import journal_path, on_disk, read_journal, start_journal
from mergeflow.exec.progress import Progress
from mergeflow.exec.run import RunOptions, _execute, _Where, _where
from mergeflow.exec.write import prepare_shard
from mergeflow.output.metadata import check_complete, publish, remove_state
from mergeflow.output.prepare import prepare_output
from mergeflow.plan import MergePlan, TensorPlan
from mergeflow.spec.sizes import human_bytes


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


def run_merge(plan: MergePlan, out_dir: str | Path, options: RunOptions | None = None,
              log=None) -> RunSummary:
    options = options or RunOptions()
    log = log or (lambda msg: None if options.quiet else print(msg, file=sys.stderr, flush=True))
    out_dir = Path(out_dir).resolve()
    started = time.monotonic()
    where = _where(options)
    prepare_output(plan, out_dir, force=options.force, resume=options.resume)
    done, headers = _start(plan, out_dir, options.resume)
    budget = budget_for(options.memory_limit, options.threads_per_worker, options.workers, options.processes)
    dsk, writes, finals = build_graph(plan, out_dir, device=options.device, skip=done, budget=budget)
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
    publish(plan, out_dir, options)
    remove_state(out_dir)
    return RunSummary(out_dir, len(todo), len(plan.tensors) - len(todo),
                      sum(i.tensor.nbytes for t in todo for i in t.all_inputs()),
                      sum(t.nbytes for t in todo) + headers, time.monotonic() - started, peak, dashboard)


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


__all__ = ["RunOptions", "RunSummary", "run_merge", "journal_path"]
