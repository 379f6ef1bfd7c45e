"""`mergeflow moe CONFIG OUT`: a mixture of experts from a mergekit-moe config, into OUT.

mergekit-moe's options are all accepted: those that change the output act as there; those
that tune how mergekit runs (threads, lazy loading, asynchronous writes) have no counterpart
here and say why in `--help`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from mergeflow.errors import MergeflowError

# mergekit-moe's options that mergeflow needs not: option -> (takes a value, why)
NO_EFFECT = {
    "--low-cpu-memory": (False, "tasks hold a few row chunks, never the model"),
    "--lazy-unpickle": (False, ".bin checkpoints are memory-mapped, never unpickled"),
    "--read-to-gpu": (False, "inputs are read in row chunks where they are used"),
    "--multi-gpu": (False, "--device cuda spreads the tasks over every GPU"),
    "--async-write": (False, "every task writes its bytes at their offset itself"),
    "--clone-tensors": (False, "no tensor is shared between outputs"),
    "--unsafe-truncate-embeddings": (False, "every expert's embedding is the base's"),
    "--write-threads": (True, "every task writes its bytes at their offset itself"),
    "--num-threads": (True, "torch's threads follow --workers and --threads-per-worker"),
    "--lora-merge-cache": (True, "LoRA adapters are applied as tensors are read"),
    "--lora-merge-dtype": (True, "LoRA deltas are computed in float32 and rounded once"),
}


def add_moe_parser(sub, size, memory_limit) -> argparse.ArgumentParser:
    """The `moe` subcommand; `size` and `memory_limit` parse sizes as `mergeflow run` does."""
    p = sub.add_parser("moe", help="assemble a mixture of experts: a mergekit-moe CONFIG in, a model OUT out")
    p.add_argument("config", help="the MoE config (YAML, mergekit-moe format)")
    p.add_argument("out", help="output directory")
    g = p.add_argument_group("mixture of experts (as mergekit-moe)")
    g.add_argument("--i-understand-this-is-not-useful-without-training", dest="allow_all_same",
                   action="store_true", help="allow experts that are all the same model (to train it after)")
    g.add_argument("--load-in-4bit", action="store_true", help="gate_mode hidden: load the base in 4 bits "
                   "for its hidden states (needs bitsandbytes)")
    g.add_argument("--load-in-8bit", action="store_true", help="the same in 8 bits")
    g.add_argument("--random-seed", type=int, default=0, help="seed of random routers and expert noise "
                   "(default 0; the same bytes on any scheduler)")
    g.add_argument("--allow-crimes", action=argparse.BooleanOptionalAction, default=False,
                   help="allow experts of another model type than the base (same shapes)")
    g.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=False,
                   help="allow model code from the Hub (tokenizer, gate_mode hidden)")
    g.add_argument("--out-shard-size", type=size, default=size("5GB"), help="largest output shard (default 5GB)")
    g.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                   help="copy the base's tokenizer to OUT (default on)")
    g.add_argument("--write-model-card", action=argparse.BooleanOptionalAction, default=True,
                   help="write README.md and mergeflow_moe_config.yml (default on)")
    g.add_argument("--safe-serialization", action=argparse.BooleanOptionalAction, default=True,
                   help="safetensors output (the only kind mergeflow writes)")
    g.add_argument("--transformers-cache", default=None, help="the Hugging Face cache to find Hub models "
                   "in (as HF_HUB_CACHE)")
    _execution_options(p, memory_limit)
    g = p.add_argument_group("mergekit-moe options with no effect here")
    for flag, (value, why) in NO_EFFECT.items():
        names = [flag] + (["-j"] if flag == "--num-threads" else [])
        if value:
            g.add_argument(*names, default=None, metavar="X", help=f"accepted: {why}")
        else:
            g.add_argument(*names, action=argparse.BooleanOptionalAction, default=False, help=f"accepted: {why}")
    return p


def _execution_options(p: argparse.ArgumentParser, memory_limit) -> None:
    """`mergeflow run`'s execution options, with mergekit's --cuda and --gpu-rich."""
    g = p.add_argument_group("execution (as `mergeflow run`)")
    g.add_argument("--scheduler", choices=["distributed", "threads", "sync"], default="distributed",
                   help="distributed (default): a local Dask cluster with dashboard; threads; sync")
    g.add_argument("--scheduler-address", default=None, help="run on an existing Dask cluster "
                   "(also $DASK_SCHEDULER_ADDRESS)")
    g.add_argument("--workers", type=int, default=None, help="local workers")
    g.add_argument("--threads-per-worker", type=int, default=None, help="threads per worker")
    g.add_argument("--processes", action="store_true", help="local workers are processes")
    g.add_argument("--memory-limit", default=None, type=memory_limit, help="memory budget per worker, e.g. 4GB")
    g.add_argument("--dashboard-address", default="127.0.0.1:8787", help="where the Dask dashboard listens")
    g.add_argument("--device", default="cpu", help="where the hidden states are computed and tensors "
                   "copied: cpu, cuda or cuda:N")
    g.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=False, help="as --device cuda")
    g.add_argument("--gpu-rich", action="store_true", help="as --device cuda")
    g.add_argument("--resume", action="store_true", help="continue an interrupted MoE in OUT")
    g.add_argument("--force", action="store_true", help="overwrite a non-empty OUT")
    g.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False, help="no progress bar")
    g.add_argument("-v", "--verbose", action="count", default=0, help="show tracebacks")


def cmd_moe(args) -> int:
    import torch

    from mergeflow.cli.process import _return_freed_memory
    from mergeflow.cli.run import _torch_threads
    from mergeflow.exec.options import RunOptions
    from mergeflow.output.moe import run_moe
    from mergeflow.plan.moe import plan_moe
    from mergeflow.spec.moe import load_moe_config

    if not args.safe_serialization:
        raise MergeflowError("--no-safe-serialization: mergeflow writes safetensors only (pickled "
                             "checkpoints can run code when loaded); drop the option")
    if args.transformers_cache:
        os.environ["HF_HUB_CACHE"] = str(Path(args.transformers_cache).expanduser())
    args.num_threads = None  # mergekit-moe's -j is accepted and not needed here: the cores as for `run`
    torch.set_num_threads(_torch_threads(args))
    _return_freed_memory()
    _quiet_transformers()
    device = "cuda" if (args.cuda or args.gpu_rich) and args.device == "cpu" else args.device
    config = load_moe_config(args.config)
    plan = plan_moe(config, out_shard_size=args.out_shard_size, random_seed=args.random_seed,
                    allow_crimes=args.allow_crimes, allow_all_same=args.allow_all_same, device=device,
                    quantization=_quantization(args, config.gate_mode), trust_remote_code=args.trust_remote_code)
    for w in plan.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"{plan.architecture}: {len(config.experts)} experts, {config.experts_per_token} per token, "
          f"{config.gate_mode} routers", file=sys.stderr)
    address = args.scheduler_address or (os.environ.get("DASK_SCHEDULER_ADDRESS") or None
                                         if args.scheduler == "distributed" else None)
    options = RunOptions(scheduler=args.scheduler, workers=args.workers, threads_per_worker=args.threads_per_worker,
                         processes=args.processes, memory_limit=args.memory_limit,
                         dashboard_address=args.dashboard_address, scheduler_address=address, device=device,
                         resume=args.resume, force=args.force, quiet=args.quiet)
    summary = run_moe(plan, Path(args.out), options, copy_tokenizer=args.copy_tokenizer,
                      model_card=args.write_model_card)
    print(summary.text(), file=sys.stderr)
    return 0


def _quiet_transformers() -> None:
    """No "Loading weights" bar of transformers' own (the gate task loads the base model)
    across mergeflow's progress line; its warnings stay."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def _quantization(args, mode: str) -> str | None:
    """--load-in-4bit / --load-in-8bit: for the hidden states only, and only with bitsandbytes."""
    from mergeflow.spec.moe import HIDDEN_MODES

    if not (args.load_in_4bit or args.load_in_8bit):
        return None
    flag = "--load-in-4bit" if args.load_in_4bit else "--load-in-8bit"
    if mode not in HIDDEN_MODES:
        print(f"warning: {flag} has no effect with gate_mode {mode}: no model is run", file=sys.stderr)
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MergeflowError(f"{flag}: loading the base quantized needs bitsandbytes, which is not "
                             "installed here; `pip install bitsandbytes`, or drop the option (the "
                             "hidden states are then computed in bfloat16)")
    if args.load_in_4bit and args.load_in_8bit:
        print("warning: --load-in-4bit and --load-in-8bit: the base is loaded in 4 bits", file=sys.stderr)
    return "4bit" if args.load_in_4bit else "8bit"
