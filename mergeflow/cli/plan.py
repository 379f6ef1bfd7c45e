"""`mergeflow plan CONFIG`: a dry run: output tensors, bytes read and written, shards, memory."""

from __future__ import annotations

import sys


def _plan(args):
    from mergeflow.plan import plan_merge
    from mergeflow.spec.config import load_config

    config = load_config(args.config)
    return plan_merge(config, out_shard_size=args.out_shard_size, random_seed=args.random_seed,
                      allow_crimes=args.allow_crimes, trust_remote_code=args.trust_remote_code,
                      unsafe_truncate_embeddings=args.unsafe_truncate_embeddings)


def _memory(args, plan):
    from mergeflow.exec.budget import estimate
    from mergeflow.exec.graph import jobs
    from mergeflow.exec.options import RunOptions
    from mergeflow.exec.run import worker_budget

    options = RunOptions(scheduler=getattr(args, "scheduler", "distributed"), workers=args.workers,
                         threads_per_worker=args.threads_per_worker, processes=args.processes,
                         memory_limit=args.memory_limit,
                         scheduler_address=getattr(args, "scheduler_address", None), cli=True)
    budget = worker_budget(options)
    return estimate(jobs(plan, ".", budget=budget), budget)


def cmd_plan(args) -> int:
    from mergeflow.spec.multi import is_multi
    from mergeflow.spec.sizes import human_bytes

    if is_multi(args.config):
        from mergeflow.cli.multi import cmd_plan_multi

        return cmd_plan_multi(args)
    plan = _plan(args)
    memory = _memory(args, plan)
    for w in plan.warnings + tuple(memory.warnings()):
        print(f"warning: {w}", file=sys.stderr)
    methods = sorted({t.method for t in plan.tensors})
    print(f"config:         {args.config} ({plan.config.merge_method})")
    print(f"models:         {', '.join(m.label for m in plan.models)}")
    print(f"output tensors: {len(plan.tensors)} ({', '.join(methods)})")
    print(f"bytes read:     {human_bytes(plan.bytes_read)}")
    print(f"bytes written:  {human_bytes(plan.bytes_written)}")
    print(f"shards:         {len(plan.shards)} ({', '.join(s.file for s in plan.shards)})")
    print(f"memory:         {memory.text()}")
    if args.tensors:
        for t in plan.tensors:
            print(f"  {t.name} {list(t.shape)} {t.out_dtype} <- "
                  + ", ".join(plan.models[i.model].label + ":" + i.tensor.name for i in t.all_inputs()))
    return 0
