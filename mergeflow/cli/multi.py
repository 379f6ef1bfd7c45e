"""`mergeflow multi CONFIG OUT`: a multi-stage merge (mergekit-multi's format) as one graph;
and what `mergeflow plan` / `validate` print for such a file.

The stages' small files (config.json, tokenizer files: what a later stage's planner reads
of an earlier stage's result, sources/stage.py) live in a temporary directory while the
command runs; no weights go there.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

from mergeflow.errors import MergeflowError


def add_multi_parser(sub, plan_options, execution_options) -> None:
    p = sub.add_parser("multi", help="multi-stage merge: a YAML of named merge configs (mergekit-multi's "
                       "format) run as one graph")
    p.add_argument("config", help="YAML documents, each a merge config with a `name`; later ones use "
                   "earlier names as models; the unnamed (or last) one is the output")
    p.add_argument("out", nargs="?", default=None, help="output directory (or --out-path)")
    g = p.add_argument_group("stages (mergekit-multi's options)")
    g.add_argument("--out-path", default=None, help="the output directory, as mergekit-multi spells it")
    _stage_options(g)
    plan_options(p)
    execution_options(p)


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """`mergeflow plan` of a multi-stage file: the stage options that change the plan."""
    _stage_options(p.add_argument_group("multi-stage files"))


def _stage_options(g) -> None:
    g.add_argument("-I", "--intermediate-dir", default=None,
                   help="also write every named stage there as a full model (DIR/<name>); without it "
                        "intermediates are computed in the graph and never written")
    g.add_argument("--lazy", action=argparse.BooleanOptionalAction, default=True,
                   help="with -I: read a stage already complete in DIR/<name> as it is (default: on, as "
                        "mergekit-multi)")


def _plan_multi(args, workdir: Path, out: Path | None):
    from mergeflow.plan.multi import plan_multi
    from mergeflow.spec.multi import load_multi

    return plan_multi(load_multi(args.config), workdir, out_dir=out, intermediate_dir=args.intermediate_dir,
                      lazy=args.lazy, out_shard_size=args.out_shard_size, random_seed=args.random_seed,
                      allow_crimes=args.allow_crimes, trust_remote_code=args.trust_remote_code,
                      unsafe_truncate_embeddings=args.unsafe_truncate_embeddings)


def _out(args) -> Path | None:
    if args.out and args.out_path and Path(args.out).resolve() != Path(args.out_path).resolve():
        raise MergeflowError(f"two output directories: {args.out} and --out-path {args.out_path}; give one")
    out = args.out or args.out_path
    return Path(out) if out else None


def cmd_multi(args) -> int:
    import torch

    from mergeflow.cli.process import _return_freed_memory
    from mergeflow.cli.run import _options, _torch_threads, mergekit_flags
    from mergeflow.output.multi import run_multi

    mergekit_flags(args)
    torch.set_num_threads(_torch_threads(args))
    _return_freed_memory()
    out = _out(args)
    with tempfile.TemporaryDirectory(prefix="mergeflow-stages-") as work:
        multi = _plan_multi(args, Path(work), out)
        gc.freeze()
        memory, _ = _memory(args, multi)
        for w in multi.warnings + tuple(memory.warnings()):
            print(f"warning: {w}", file=sys.stderr)
        for name, directory in multi.reused:
            print(f"stage {name}: complete in {directory}, read as it is (--no-lazy merges it again)",
                  file=sys.stderr)
        summary = run_multi(multi, _options(args))
    print(summary.text(), file=sys.stderr)
    return 0


def _memory(args, multi):
    """The memory estimate over every tensor the run merges (spills included)."""
    from mergeflow.exec.budget import budget_for, estimate
    from mergeflow.exec.chain import place
    from mergeflow.exec.graph import jobs

    budget = budget_for(args.memory_limit, args.threads_per_worker, args.workers, args.processes)
    every = []
    for s in multi.written:
        placement = place(s.plan, s.out_dir, budget)
        every += jobs(placement.plan, s.out_dir, budget=budget)
        every += [j for p in placement.spills for j in jobs(p.plan, p.out_dir, budget=budget)]
    return estimate(every, budget), budget


def cmd_validate_multi(args) -> int:
    from mergeflow.spec.multi import load_multi

    multi = load_multi(args.config)
    if not args.config_only:
        with tempfile.TemporaryDirectory(prefix="mergeflow-stages-") as work:
            plan = _plan_multi(args, Path(work), Path("OUT"))
        for w in plan.warnings:
            print(f"warning: {w}", file=sys.stderr)
    print(f"{args.config}: ok ({len(multi.documents)} stages: "
          + ", ".join(f"{d.name or 'output'} ({d.config.merge_method})" for d in multi.documents) + ")")
    return 0


def cmd_plan_multi(args) -> int:
    with tempfile.TemporaryDirectory(prefix="mergeflow-stages-") as work:
        multi = _plan_multi(args, Path(work), Path("OUT"))
        memory, budget = _memory(args, multi)
        for w in multi.warnings + tuple(memory.warnings()):
            print(f"warning: {w}", file=sys.stderr)
        print(report(args.config, multi, memory, budget, tensors=args.tensors))
    return 0


def report(path: str, multi, memory, budget, *, tensors: bool = False) -> str:
    """The dry run of a multi-stage merge: the stages, what flows between them, the bytes."""
    out = multi.output.plan
    lines = [f"config:         {path} ({len(multi.stages)} stages: "
             + " -> ".join(s.name or "output" for s in multi.stages) + ")"]
    lines += _stage_lines(multi) + _flow_lines(multi) + _byte_lines(multi, budget)
    lines.append(f"shards:         {len(out.shards)} ({', '.join(s.file for s in out.shards)})")
    lines.append(f"memory:         {memory.text()}")
    for t in out.tensors if tensors else ():
        lines.append(f"  {t.name} {list(t.shape)} {t.out_dtype} <- " + ", ".join(_source(out, i) for i in t.all_inputs()))
    return "\n".join(lines)


def _stage_lines(multi) -> list[str]:
    from mergeflow.spec.sizes import human_bytes

    lines = []
    for s in multi.stages:
        title = f"stage {s.name}:" if s.name else "output:"
        where = ("written to OUT" if s is multi.output else f"written to {s.out_dir}" if s.out_dir is not None
                 else "computed in the graph, never written")
        models = ", ".join(m.label for m in s.plan.models)
        lines.append(f"{title:15} {s.plan.config.merge_method} of {models} -> {len(s.plan.tensors)} tensors, "
                     f"{human_bytes(s.plan.bytes_written)}; {where}")
    return lines + [f"reused:         stage {n} read from {d} (complete there; --no-lazy merges it again)"
                    for n, d in multi.reused]


def _flow_lines(multi) -> list[str]:
    """Per pair of stages: the tensors of one the other reads, and how often it reads them."""
    from mergeflow.sources.stage import StageModel
    from mergeflow.spec.sizes import human_bytes

    lines = []
    for s in multi.stages:
        reads: dict[str, list[str]] = {}
        for t in s.plan.tensors:
            for i in t.all_inputs():
                model = s.plan.models[i.model]
                if isinstance(model, StageModel):
                    reads.setdefault(model.stage, []).append(i.tensor.name)
        for name, read in reads.items():
            size = sum(t.nbytes for t in multi.stage(name).plan.tensors if t.name in set(read))
            lines.append(f"flow:           {name} -> {s.name or 'output'}: {len(set(read))} tensors "
                         f"({human_bytes(size)}), read {len(read)} times")
    return lines


def _byte_lines(multi, budget) -> list[str]:
    """Bytes read and written against running the stages one by one, and the placements."""
    from mergeflow.exec.chain import place
    from mergeflow.output.multi import stored_reads
    from mergeflow.spec.sizes import human_bytes as hb

    held, spilled, spill_bytes, read = [], [], 0, 0
    for s in multi.written:
        placement = place(s.plan, s.out_dir, budget)
        held += [f"{t} holds {', '.join(xs)}" for t, xs in placement.held]
        spilled += [f"{t} ({hb(n)})" for t, n in placement.spilled]
        spill_bytes += sum(n for _, n in placement.spilled)
        read += sum(stored_reads(t) for p in (placement.plan, *(x.plan for x in placement.spills)) for t in p.tensors)
    written = sum(s.plan.bytes_written for s in multi.written) + spill_bytes
    alone = sum(s.plan.bytes_written for s in multi.stages)
    alone_read = sum(i.tensor.nbytes for s in multi.stages for t in s.plan.tensors for i in t.all_inputs())
    lines = [f"bytes read:     {hb(read)} of stored inputs (stage by stage: {hb(alone_read)}, "
             "intermediates included)",
             f"bytes written:  {hb(written)} (stage by stage: {hb(alone)}; not written: {hb(alone - written)})"]
    if held:
        lines.append(f"held whole:     {len(held)} tensor(s) gather intermediate rows by token and hold them: "
                     + "; ".join(held))
    if spilled:
        lines.append(f"spilled:        {len(spilled)} intermediate tensor(s) written to OUT/.mergeflow/spill "
                     "while the merge runs: read by token where they cannot be held whole (over the "
                     "memory budget, or read by another intermediate): " + ", ".join(spilled))
    return lines


def _source(plan, inp) -> str:
    if inp.stage is not None:
        return f"{inp.stage.name}:{inp.stage.tensor.name}"
    return f"{plan.models[inp.model].label}:{inp.tensor.name}"
