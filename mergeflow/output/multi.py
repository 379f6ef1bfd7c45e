"""Run a multi-stage merge (plan/multi.py) as one graph into its output directories.

The output goes to OUT; with -I every named stage also goes to DIR/<name> as a full model,
and later stages read its shards (exec/chain.py orders those reads after the writes).
Without -I the intermediates are computed where they are read and never written, except a
tensor spilled to OUT/.mergeflow/spill/ (exec/chain.py, `place`). Each written directory is
checked, journaled and published as `mergeflow run` does it (output/merge.py): config.json
last, --force/--resume as there. OUT's journal carries the fingerprint of the output stage,
which covers every stage it reads, so --resume refuses a chain changed anywhere; with -I each
intermediate directory resumes from its own journal, as any mergeflow output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

from mergeflow.errors import MergeflowError
from mergeflow.exec import cluster
from mergeflow.exec.chain import Part, Placement, chain_graph, place
from mergeflow.exec.journal import journal_path, read_journal
from mergeflow.exec.options import RunOptions
from mergeflow.exec.progress import Progress
from mergeflow.exec.run import _execute, _where, worker_budget
from mergeflow.output.card import chain_card
from mergeflow.output.merge import MergeInterrupted, RunSummary, _unfinished
from mergeflow.output.metadata import check_complete, publish, remove_state
from mergeflow.output.prepare import OutputState, check_output, lock_output, prepare_output
from mergeflow.plan import MergePlan, TensorPlan
from mergeflow.plan.multi import MultiPlan, StagePlan
from mergeflow.sources.models import ModelInfo
from mergeflow.sources.stage import StageModel


def run_multi(multi: MultiPlan, options: RunOptions | None = None, log=None) -> RunSummary:
    """Merge every stage of `multi` as one graph (see the module doc). Each written directory
    is checked before anything is made and locked for the whole run; nothing is written
    until the scheduler is up and every check passed."""
    options = options or RunOptions()
    started = time.monotonic()
    where = _where(options)
    written = multi.written
    _check_directories(written)
    stored = stored_models(multi)
    checked = [(s, dataclasses.replace(s.plan, models=stored)) for s in written]
    for s, plan in checked:  # before anything is made, the directories themselves included
        check_output(plan, s.out_dir, options)
    with contextlib.ExitStack() as locks:
        for s, _ in checked:
            locks.enter_context(lock_output(s.out_dir))
        states = [check_output(plan, s.out_dir, options) for s, plan in checked]  # again, locked
        return _run(multi, options, where, states, log, started)


def _run(multi: MultiPlan, options: RunOptions, where, states: list[OutputState], log, started: float) -> RunSummary:
    written = multi.written
    budget = worker_budget(options, where)
    parts = [Part(s.plan, s.out_dir, "" if s is multi.output else s.name, state.done)
             for s, state in zip(written, states)]
    parts, spills = _placed(parts, budget, options.device)
    graph = chain_graph(parts + spills, device=options.device, budget=budget)
    todo = [t for p in parts for t in p.plan.tensors if t.name not in p.skip]
    progress = Progress(len(todo), sum(t.nbytes for t in todo), quiet=options.quiet)
    log = log or (lambda msg: None if options.quiet else progress.write(msg))
    writes = [w for k in range(len(parts)) for w in graph.writes[k]]
    out = multi.output.out_dir
    headers: list[int] = []

    def ready(client) -> None:  # the scheduler is up: its last checks, then the first writes
        _check_cluster(client, where, parts + spills, out, options)
        for s, state in zip(written, states):
            headers.append(prepare_output(s.plan, s.out_dir, state))
        for spill in spills:  # merged again on resume
            spill.out_dir.mkdir(parents=True, exist_ok=True)
            headers.append(prepare_output(spill.plan, spill.out_dir, OutputState()))

    try:
        dashboard, peak = _execute(graph.dsk, writes, graph.finals, options, where, progress, log, ready)
    except KeyboardInterrupt:
        raise MergeInterrupted(_unfinished(out, headers, options)) from None
    except MergeflowError as e:
        raise MergeflowError(f"{e}\nThe merge stopped; {_unfinished(out, headers, options)}") from None
    for s in written:  # intermediates first: the output is complete last
        _publish(multi, s, options)
    spilled = sum(t.nbytes for p in spills for t in p.plan.tensors)
    return RunSummary(out, len(todo), sum(len(p.skip) for p in parts), sum(stored_reads(t) for t in todo),
                      sum(t.nbytes for t in todo) + sum(headers) + spilled, time.monotonic() - started, peak,
                      dashboard)


def _check_directories(written: tuple[StagePlan, ...]) -> None:
    """No written directory is, holds or sits inside another."""
    dirs = [(s, s.out_dir.resolve()) for s in written]
    for i, (a, da) in enumerate(dirs):
        for b, db in dirs[i + 1:]:
            if da == db or da in db.parents or db in da.parents:
                raise MergeflowError(f"{a.document.title} is written to {da} and {b.document.title} to {db}: "
                                     "they overlap; choose an output directory outside --intermediate-dir")


def stored_models(multi: MultiPlan) -> tuple[ModelInfo, ...]:
    """Every model of the chain read from disk (earlier stages' results are not)."""
    seen: dict[str, ModelInfo] = {}
    for s in multi.stages:
        for m in s.plan.models:
            if not isinstance(m, StageModel):
                seen.setdefault(m.path, m)
    return tuple(seen.values())


def _placed(parts: list[Part], budget, device: str) -> tuple[list[Part], list[Part]]:
    """Every part with its intermediates placed (held whole or spilled), and the spill parts."""
    out, spills = [], []
    for p in parts:
        if all(t.name in p.skip for t in p.plan.tensors):
            out.append(p)
            continue
        placement: Placement = place(p.plan, p.out_dir, budget, device)
        out.append(dataclasses.replace(p, plan=placement.plan))
        spills += list(placement.spills)
    return out, spills


def _publish(multi: MultiPlan, s: StagePlan, options: RunOptions) -> None:
    finished, _ = read_journal(s.out_dir, s.plan.fingerprint)
    check_complete(s.plan, s.out_dir, finished)
    if s is multi.output:  # mergekit_config.yml: the whole multi-stage file, which made it
        plan = dataclasses.replace(s.plan, config=s.plan.config.model_copy(update={"text": multi.config.text}))
        publish(plan, s.out_dir, options, chain_card(multi))
    else:
        publish(s.plan, s.out_dir, options)
    remove_state(s.out_dir)


def stored_reads(t: TensorPlan) -> int:
    """Bytes of stored inputs that computing `t` reads (an intermediate's inputs once per read)."""
    return sum(stored_reads(i.stage.tensor) if i.stage is not None else i.tensor.nbytes for i in t.all_inputs())


def _input_files(plans: list[MergePlan]) -> list[str]:
    files = []
    todo = [t for p in plans for t in p.tensors]
    while todo:
        t = todo.pop()
        for i in t.all_inputs():
            if i.stage is not None:
                todo.append(i.stage.tensor)
            else:
                files.append(i.tensor.file)
                files += [i.tensor.lora.file] if i.tensor.lora is not None else []
    return files


def _check_cluster(client, where, parts: list[Part], out: Path, options: RunOptions) -> None:
    """An existing cluster's workers must see every file the chain reads and writes."""
    if not where.address:
        return
    writable = [str(p.out_dir / s.file) for p in parts for s in p.plan.shards]
    writable += [str(journal_path(p.out_dir).parent) for p in parts]
    cluster.check_workers(client, where.address, cluster.input_files(_input_files([p.plan for p in parts])),
                          out, writable, options.device)
