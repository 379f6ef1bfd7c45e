"""`mergeflow run CONFIG OUT`: plan, then merge into OUT; mergekit-yaml's flags mapped to
mergeflow's options (`mergekit_flags`)."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

from mergeflow.cli.plan import _memory, _plan
from mergeflow.cli.process import _return_freed_memory
from mergeflow.errors import MergeflowError

# mergekit-yaml's flags that mergeflow accepts without needing them: why (printed when given)
NOT_NEEDED = {
    "lazy_unpickle": "mergeflow maps .bin inputs (torch.load with mmap) and reads each tensor only "
                     "when it is merged",
    "low_cpu_memory": "each merged tensor is written to OUT as soon as it is computed; results are not "
                      "kept in memory until the end (bound memory with --memory-limit)",
    "read_to_gpu": "with --device cuda each tensor (or row chunk) goes to the GPU as soon as it is read",
    "async_write": "every tensor is written at its own offset by the task that merged it, while other "
                   "tensors are being merged",
    "write_threads": "writes run in the merge's own tasks (sized by -j, --workers, --threads-per-worker)",
    "clone_tensors": "each output tensor is written to its own bytes, so a layer used twice is saved "
                     "twice without cloning",
    "lora_merge_cache": "LoRA adapters are applied to each tensor as it is read; no merged copy of a "
                        "model is stored",
}


def cmd_run(args) -> int:
    import torch

    from mergeflow.output.merge import run_merge
    from mergeflow.plan.tokenizer import tokenizer_setting

    mergekit_flags(args)
    torch.set_num_threads(_torch_threads(args))
    _return_freed_memory()
    plan = _plan(args)
    gc.freeze()  # the ~200k objects of torch, dask and the plan: the merge's collections skip them
    for w in plan.warnings + tuple(_memory(args, plan).warnings()):
        print(f"warning: {w}", file=sys.stderr)
    options = _options(args)
    if not args.copy_tokenizer and plan.config.chat_template and tokenizer_setting(plan.config) is None:
        print("warning: --no-copy-tokenizer: no tokenizer is saved, so the config's chat_template is "
              "not saved either (as in mergekit)", file=sys.stderr)
    summary = run_merge(plan, Path(args.out), options)
    print(summary.text(), file=sys.stderr)
    return 0


def _options(args):
    """The execution options of `run` (and `multi`) as RunOptions."""
    from mergeflow.exec.options import RunOptions

    address = args.scheduler_address or (os.environ.get("DASK_SCHEDULER_ADDRESS") or None
                                         if args.scheduler == "distributed" else None)
    return RunOptions(scheduler=args.scheduler, workers=args.workers,
                      threads_per_worker=args.threads_per_worker, processes=args.processes,
                      memory_limit=args.memory_limit, dashboard_address=args.dashboard_address,
                      scheduler_address=address, device=args.device or "cpu",
                      resume=args.resume, force=args.force, quiet=args.quiet,
                      copy_tokenizer=getattr(args, "copy_tokenizer", True),
                      write_model_card=getattr(args, "write_model_card", True),
                      safe_serialization=getattr(args, "safe_serialization", True), cli=True)


def _torch_threads(args) -> int:
    """torch's intra-op threads here: the cores shared among the tasks this process runs at
    once (a thread per task; 2 torch threads under 2 task threads measured 1.5x slower)."""
    from mergeflow.exec.budget import local_sizes

    cores = args.num_threads or os.cpu_count() or 1
    if args.scheduler == "sync" or args.processes:  # process workers set their own
        return cores
    if args.scheduler == "threads":
        return max(1, cores // (args.threads_per_worker or cores))
    workers, threads = local_sizes(args.workers, args.threads_per_worker, False)
    return max(1, cores // (workers * threads))


def mergekit_flags(args) -> None:
    """mergekit-yaml's flags as mergeflow's options, set on `args` (device, threads, the Hub
    cache); one line on stderr for each given flag mergeflow does not need."""
    for flag, why in NOT_NEEDED.items():
        if getattr(args, flag):
            print(f"note: --{flag.replace('_', '-')} is not needed: {why}", file=sys.stderr)
    if args.gpu_rich:
        print("note: --gpu-rich runs as --device cuda (every GPU, one worker each); the --low-cpu-memory "
              "and --read-to-gpu it implies are not needed: results go to OUT as they are computed and "
              "inputs to the GPU as they are read", file=sys.stderr)
    args.device = _device(args)
    if args.num_threads:
        _share_threads(args)
    if args.transformers_cache:  # where huggingface_hub looks (sources/models.py reads it per model)
        os.environ["HF_HUB_CACHE"] = str(Path(args.transformers_cache).expanduser().resolve())


def _device(args) -> str:
    """--device, or cuda for --cuda / --multi-gpu / --gpu-rich (an explicit --device wins, as in
    mergekit); `auto`: cuda if there is one."""
    every_gpu = args.multi_gpu or args.gpu_rich
    if every_gpu and args.device not in (None, "cuda", "auto"):
        flag = "--multi-gpu" if args.multi_gpu else "--gpu-rich"
        raise MergeflowError(f"{flag} runs on every GPU (--device cuda); it cannot be combined with "
                             f"--device {args.device}. Drop one of them")
    device = args.device or ("cuda" if args.cuda or every_gpu else "cpu")
    if device == "auto":
        import torch

        device = "cuda" if every_gpu or torch.cuda.is_available() else "cpu"
    return device


def _share_threads(args) -> None:
    """-j N: N CPU threads for the merge, as mergekit's torch.set_num_threads(N) bounds its ops
    (run one at a time). mergeflow runs several tasks at once, so N is shared: the local
    workers' threads (unless --workers/--threads-per-worker set them) and torch's threads in
    each task (_torch_threads) multiply to about N."""
    n = args.num_threads
    if args.scheduler == "distributed" and (args.scheduler_address or os.environ.get("DASK_SCHEDULER_ADDRESS")):
        raise MergeflowError("-j/--num-threads sizes the local workers; an existing Dask cluster "
                             "(--scheduler-address, DASK_SCHEDULER_ADDRESS) brings its own. Drop -j")
    if args.scheduler == "sync":
        return  # one task at a time, with N torch threads
    if args.scheduler == "threads":
        args.threads_per_worker = args.threads_per_worker or n
    elif args.processes:  # single-threaded process workers (cluster.local_sizes)
        args.workers = args.workers or max(1, n // (args.threads_per_worker or 1))
    else:
        from mergeflow.exec.cluster import gpu_ids

        gpus = len(gpu_ids(args.device))  # several: a process worker per GPU
        args.threads_per_worker = args.threads_per_worker or max(1, n // (args.workers or max(gpus, 1)))
