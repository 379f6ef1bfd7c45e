"""The `mergeflow` command: the parser, the exit codes, and one module per command.

cli/ is the only place that configures the process (logging, warnings, torch threads). A
user error (MergeflowError) exits 2 with its message and no traceback; `-v` shows it.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from mergeflow import __version__
from mergeflow.cli.methods import cmd_methods
from mergeflow.cli.multi import add_multi_parser, add_plan_arguments, cmd_multi
from mergeflow.cli.plan import cmd_plan
from mergeflow.cli.process import THP_ENV, _terminal
from mergeflow.cli.run import cmd_run
from mergeflow.cli.validate import cmd_validate
from mergeflow.errors import MergeflowError
from mergeflow.spec.sizes import parse_size

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1


def size(text: str) -> int:
    """A size argument (`5GB`, `500MB`, `2e9`), as spec.sizes reads it."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def memory_limit(text: str) -> str:
    """A size as parse_size reads it, or `auto`; kept as text for dask."""
    if text.strip().lower() != "auto":
        size(text)
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergeflow", description="Merge pretrained language "
                                     "models from a mergekit-format YAML config, through a Dask graph.")
    parser.add_argument("--version", action="version", version=f"mergeflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="merge: CONFIG in, a model directory OUT out")
    run.add_argument("config", help="the merge config (YAML, mergekit format)")
    run.add_argument("out", help="output directory")
    _plan_options(run)
    _execution_options(run)
    add_multi_parser(sub, _plan_options, _execution_options)

    val = sub.add_parser("validate", help="check a config (and its models' headers) without merging")
    val.add_argument("config")
    val.add_argument("--config-only", action="store_true", help="check the YAML only; read no model")
    _plan_options(val)

    plan = sub.add_parser("plan", help="dry run: output tensors, bytes read and written, shards")
    plan.add_argument("config")
    plan.add_argument("--tensors", action="store_true", help="list every output tensor")
    _plan_options(plan)
    g = plan.add_argument_group("memory estimate (as `mergeflow run` would use them)")
    g.add_argument("--workers", type=int, default=None, help="local workers")
    g.add_argument("--threads-per-worker", type=int, default=None, help="threads per worker")
    g.add_argument("--processes", action="store_true", help="local workers are processes")
    g.add_argument("--memory-limit", default=None, type=memory_limit, help="memory budget per worker")

    sub.add_parser("methods", help="list the merge methods and their parameters")
    add_plan_arguments(plan)
    add_plan_arguments(val)
    for p in (run, val, plan, sub.choices["multi"]):
        p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
    return parser


def _execution_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--scheduler", choices=["distributed", "threads", "sync"], default="distributed",
                   help="distributed (default): a local Dask cluster with dashboard; threads: dask's "
                        "threaded scheduler; sync: one thread, for debugging")
    g.add_argument("--scheduler-address", default=None,
                   help="run on an existing Dask cluster (also $DASK_SCHEDULER_ADDRESS)")
    g.add_argument("--workers", type=int, default=None, help="local workers (default: 1, or one per "
                   "core with --processes)")
    g.add_argument("--threads-per-worker", type=int, default=None, help="threads per worker (default: the cores divided among the workers)")
    g.add_argument("--processes", action="store_true", help="local workers are processes (each tensor's load, merge and write are one task)")
    g.add_argument("--memory-limit", default=None, type=memory_limit,
                   help="memory budget per worker, e.g. 4GB")
    g.add_argument("--dashboard-address", default="127.0.0.1:8787",
                   help="where the Dask dashboard listens (default 127.0.0.1:8787)")
    g.add_argument("--device", default="cpu", help="where merge ops run: cpu, cuda (one process worker per GPU when there are several) or cuda:N")
    g.add_argument("--resume", action="store_true", help="continue an interrupted merge in OUT")
    g.add_argument("--force", action="store_true", help="overwrite a non-empty OUT")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def _plan_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("planning")
    g.add_argument("--out-shard-size", type=size, default=parse_size("5GB"),
                   help="largest output shard (default 5GB)")
    g.add_argument("--random-seed", type=int, default=0, help="seed for random methods (default 0)")
    g.add_argument("--allow-crimes", action="store_true", help="allow merging different architectures")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code from the Hub when loading tokenizers (off by default)")
    g.add_argument("--unsafe-truncate-embeddings", action="store_true",
                   help="without a tokenizer setting, cut embeddings of different vocabulary sizes to "
                        "the smallest (as mergekit; safe only if the models number tokens alike)")


def main(argv: list[str] | None = None) -> int:
    # torch backs CPU tensors of 2 MB and more with transparent huge pages: a merge allocates
    # and frees a tensor-sized buffer per op, and faulting those in 4 KB pages cost as much
    # system time as the merge itself (README, "Speed and memory"). Read by torch at its first
    # allocation, so set before torch is imported; worker processes inherit it.
    os.environ.setdefault(THP_ENV, "1")
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    try:
        with _terminal(verbose):
            return COMMANDS[args.command](args)
    except MergeflowError as e:
        if verbose:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the machine's problem (disk full, permissions): the user can fix it
        if verbose:
            traceback.print_exc()
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}" + ("" if verbose else " (rerun with -v for the "
              "traceback)"), file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:  # a bug in mergeflow: a short message, the traceback only with -v
        if verbose:
            traceback.print_exc()
        print(f"error: internal error: {type(e).__name__}: {e}\nThis is a bug in mergeflow"
              + ("" if verbose else "; rerun with -v for the traceback and report it"), file=sys.stderr)
        return EXIT_INTERNAL_ERROR


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "plan": cmd_plan, "methods": cmd_methods,
            "multi": cmd_multi}

