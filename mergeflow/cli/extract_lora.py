"""`mergeflow extract-lora`: a fine-tune and its base in, a PEFT LoRA adapter out.

mergekit-extract-lora's command line, read unchanged (`--model`, `--base-model`, `--out-path`,
`--max-rank`, ...): its options act as they do there, and those mergeflow has no use for are
accepted with one line saying why. mergeflow's execution options (scheduler, workers,
device, --resume, --force) are those of `mergeflow run`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

# mergekit options accepted for its command lines' sake, and why mergeflow needs none of them
NOT_NEEDED = {
    "allow_crimes": "--allow-crimes: not needed: each LoRA pairs the fine-tune's and the base's "
                    "tensor of the same name, and different shapes are refused",
    "unsafe_truncate_embeddings": "--unsafe-truncate-embeddings: not needed: embeddings of another "
                                  "vocabulary size are saved whole (modules_to_save), as mergekit does",
    "lora_merge_cache": "--lora-merge-cache: not needed: a model+adapter reference is applied as "
                        "each tensor is read; no merged copy is stored",
    "lora_merge_dtype": "--lora-merge-dtype: not needed: an input adapter's delta is added in "
                        "float32 and rounded once to the weight's dtype",
    "random_seed": "--random-seed: not needed: the extraction uses no random numbers",
    "low_cpu_memory": "--low-cpu-memory: not needed: each task holds one weight's change at a time",
    "lazy_unpickle": "--lazy-unpickle: not needed: .bin checkpoints are memory-mapped, weights only",
    "read_to_gpu": "--read-to-gpu: not needed: each task moves its weights to --device itself",
    "async_write": "--async-write: not needed: every task writes its own tensors at their offsets",
    "write_threads": "--write-threads: not needed: every task writes its own tensors at their offsets",
    "out_shard_size": "--out-shard-size: not used: PEFT reads one adapter_model.safetensors "
                      "(mergekit-extract-lora does not shard either)",
    "copy_tokenizer": "--copy-tokenizer: not used: an adapter directory holds no tokenizer "
                      "(mergekit-extract-lora copies none either)",
    "clone_tensors": "--clone-tensors: not needed: no tensor is written twice",
    "safe_serialization": "--safe-serialization: not used: the adapter is always safetensors, the "
                          "format PEFT loads first",
}


def add_extract_lora(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("extract-lora", help="extract a LoRA adapter: a fine-tune minus its base, "
                       "by truncated SVD (mergekit-extract-lora's options)")
    g = p.add_argument_group("extraction (mergekit-extract-lora's options)")
    g.add_argument("--model", required=True, help="the fine-tuned model (directory or Hub id)")
    g.add_argument("--base-model", required=True, help="its base model")
    g.add_argument("--out-path", required=True, help="output directory for the adapter")
    g.add_argument("--max-rank", type=int, default=128, help="largest LoRA rank (default 128)")
    g.add_argument("--sv-epsilon", type=float, default=0.0,
                   help="drop singular values at or below this (default 0: keep up to --max-rank)")
    g.add_argument("--distribute-scale", action=argparse.BooleanOptionalAction, default=True,
                   help="split the singular values as sqrt(S) into both A and B (default); "
                        "--no-distribute-scale puts them in A")
    g.add_argument("--embed-lora", action=argparse.BooleanOptionalAction, default=False,
                   help="decompose embeddings too (default: saved whole, as modules_to_save)")
    g.add_argument("--save-module", dest="modules_to_save", action="append", default=[],
                   metavar="NAME", help="save this module whole (its name or last name part; repeatable)")
    g.add_argument("-e", "--exclude-regex", dest="exclude", action="append", default=[],
                   metavar="REGEX", help="leave out modules whose name matches (repeatable)")
    g.add_argument("-i", "--include-regex", dest="include", action="append", default=[],
                   metavar="REGEX", help="only decompose modules whose name matches (repeatable)")
    g.add_argument("--skip-undecomposable", action="store_true",
                   help="leave out modules with no LoRA form (norms) instead of saving them whole")
    g.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=False,
                   help="allow the model's own code from the Hub (to list its modules)")
    g.add_argument("--transformers-cache", default=None, metavar="DIR",
                   help="the Hugging Face cache to find Hub models in (sets HF_HUB_CACHE)")
    g.add_argument("--write-model-card", action=argparse.BooleanOptionalAction, default=True,
                   help="write README.md (default)")
    _execution_options(p)
    _mergekit_aliases(p)
    return p


def _execution_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("execution (as for `mergeflow run`)")
    g.add_argument("--scheduler", choices=["distributed", "threads", "sync"], default="distributed",
                   help="distributed (default): a local Dask cluster with dashboard; threads; sync")
    g.add_argument("--scheduler-address", default=None,
                   help="run on an existing Dask cluster (also $DASK_SCHEDULER_ADDRESS)")
    g.add_argument("--workers", type=int, default=None, help="local workers")
    g.add_argument("--threads-per-worker", type=int, default=None,
                   help="threads per worker: weights decomposed at once on each")
    g.add_argument("--processes", action="store_true", help="local workers are processes")
    g.add_argument("--dashboard-address", default="127.0.0.1:8787", help="where the Dask dashboard listens")
    g.add_argument("--device", default=None, help="where the SVDs run: cpu (default), cuda or cuda:N")
    g.add_argument("--resume", action="store_true", help="continue an interrupted extraction in OUT")
    g.add_argument("--force", action="store_true", help="write into a non-empty OUT")
    g.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False,
                   help="no progress bar and no per-module table")
    g.add_argument("-v", "--verbose", action="count", default=0, help="show tracebacks")


def _mergekit_aliases(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mergekit's other options (accepted; each one given says why mergeflow needs none)")
    g.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=None, help="= --device cuda")
    g.add_argument("--multi-gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="= --device cuda (one worker per GPU when there are several)")
    g.add_argument("--gpu-rich", action="store_true", default=None, help="= --device cuda")
    g.add_argument("-j", "--num-threads", type=int, default=None, help="= --threads-per-worker")
    for flag in ("allow-crimes", "unsafe-truncate-embeddings", "low-cpu-memory", "lazy-unpickle",
                 "read-to-gpu", "async-write", "copy-tokenizer", "clone-tensors", "safe-serialization"):
        g.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=None,
                       help=NOT_NEEDED[flag.replace("-", "_")].split(": ", 1)[1])
    for flag in ("lora-merge-cache", "lora-merge-dtype", "random-seed", "write-threads", "out-shard-size"):
        g.add_argument(f"--{flag}", default=None, help=NOT_NEEDED[flag.replace("-", "_")].split(": ", 1)[1])


def _device(args) -> str:
    if args.device:
        return args.device
    return "cuda" if args.cuda or args.multi_gpu or args.gpu_rich else "cpu"


def invocation(args) -> str:
    """The command line, rebuilt from what it means (the card's record of how it was made)."""
    words = ["mergeflow", "extract-lora", "--model", args.model, "--base-model", args.base_model,
             "--out-path", args.out_path, "--max-rank", str(args.max_rank)]
    if args.sv_epsilon:
        words += ["--sv-epsilon", repr(args.sv_epsilon)]
    words += [] if args.distribute_scale else ["--no-distribute-scale"]
    words += ["--embed-lora"] if args.embed_lora else []
    for flag, values in (("--save-module", args.modules_to_save), ("-e", args.exclude), ("-i", args.include)):
        for v in values:
            words += [flag, v]
    words += ["--skip-undecomposable"] if args.skip_undecomposable else []
    return shlex.join(words)


def cmd_extract_lora(args) -> int:
    import torch

    from mergeflow.cli.process import _return_freed_memory
    from mergeflow.cli.run import _torch_threads
    from mergeflow.exec.options import RunOptions
    from mergeflow.output.extract_lora import run_extraction
    from mergeflow.plan.extract_lora import ExtractOptions, plan_extraction

    for name, why in NOT_NEEDED.items():
        if getattr(args, name, None) is not None:
            print(f"note: {why}", file=sys.stderr)
    if args.transformers_cache:
        os.environ["HF_HUB_CACHE"] = args.transformers_cache
    if args.num_threads and not args.threads_per_worker and args.scheduler != "sync":
        args.threads_per_worker = args.num_threads
    torch.set_num_threads(_torch_threads(args))  # the SVDs themselves run on one thread each
    _return_freed_memory()
    options = ExtractOptions(max_rank=args.max_rank, sv_epsilon=args.sv_epsilon,
                             distribute_scale=args.distribute_scale, embed_lora=args.embed_lora,
                             modules_to_save=tuple(args.modules_to_save), include=tuple(args.include),
                             exclude=tuple(args.exclude), skip_undecomposable=args.skip_undecomposable,
                             trust_remote_code=args.trust_remote_code)
    plan = plan_extraction(args.model, args.base_model, options)
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    address = args.scheduler_address or (os.environ.get("DASK_SCHEDULER_ADDRESS") or None
                                         if args.scheduler == "distributed" else None)
    run = RunOptions(scheduler=args.scheduler, workers=args.workers, threads_per_worker=args.threads_per_worker,
                     processes=args.processes, dashboard_address=args.dashboard_address,
                     scheduler_address=address, device=_device(args), resume=args.resume,
                     force=args.force, quiet=args.quiet, cli=True)
    summary = run_extraction(plan, args.out_path, run, invocation=invocation(args),
                             write_card=args.write_model_card)
    if not args.quiet:
        print(summary.table())
    print(summary.text(), file=sys.stderr)
    return 0
