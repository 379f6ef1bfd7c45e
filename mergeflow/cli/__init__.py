"""The `mergeflow` command: the parser, the exit codes, and one module per command.

cli/ is the only place that configures the process (logging, warnings, torch threads). A
user error (MergeflowError) exits 2 with its message and no traceback; `-v` shows it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import traceback

from mergeflow import __version__
from mergeflow.cli.extract_lora import add_extract_lora, cmd_extract_lora
from mergeflow.cli.methods import cmd_methods
from mergeflow.cli.moe import add_moe_parser, cmd_moe
from mergeflow.cli.multi import add_multi_parser, add_plan_arguments, cmd_multi
from mergeflow.cli.plan import cmd_plan
from mergeflow.cli.process import THP_ENV, _terminal
from mergeflow.cli.run import NOT_NEEDED, cmd_run
from mergeflow.cli.validate import cmd_validate
from mergeflow.errors import MergeflowError
from mergeflow.spec.sizes import parse_size

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


def size(text: str) -> int:
    """A size argument (`5B`, `4GB`, `4GiB`, `2e9`), as spec.sizes reads it."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def memory_limit(text: str) -> str:
    """A size as parse_size reads it, or `auto` (dask's: the machine's memory); checked here,
    kept as the user wrote it (RunOptions reads it, and its messages quote it)."""
    if text.strip().lower() != "auto":
        size(text)
    return text


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergeflow", description="Merge pretrained language "
                                     "models from a mergekit-format YAML config, through a Dask graph.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mergeflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="merge: CONFIG in, a model directory OUT out")
    run.add_argument("config", help="the merge config (YAML, mergekit format)")
    run.add_argument("out", help="output directory")
    _plan_options(run)
    _execution_options(run)
    _mergekit_options(run)
    add_multi_parser(sub, _plan_options, _execution_options)
    _mergekit_options(sub.choices["multi"])

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
    add_extract_lora(sub)
    add_moe_parser(sub, size, memory_limit)
    add_plan_arguments(plan)
    add_plan_arguments(val)
    for p in (run, val, plan, sub.choices["multi"]):
        p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
    return parser


def _execution_options(p: argparse.ArgumentParser) -> None:
    """How a command runs its graph (run, multi): the scheduler, workers, memory, device, OUT."""
    g = p.add_argument_group("execution")
    g.add_argument("--scheduler", choices=["distributed", "threads", "sync"], default="distributed",
                   help="distributed (default): a local Dask cluster with dashboard; threads: dask's "
                        "threaded scheduler; sync: one thread, for debugging")
    g.add_argument("--scheduler-address", default=None,
                   help="run on an existing Dask cluster (also $DASK_SCHEDULER_ADDRESS)")
    g.add_argument("--workers", type=int, default=None, help="local workers (default: 1, or one per "
                   "4 cores with --processes)")
    g.add_argument("--threads-per-worker", type=int, default=None, help="threads per worker (default: the cores divided among the workers)")
    g.add_argument("--processes", action="store_true", help="local workers are processes (each tensor's load, merge and write are one task)")
    g.add_argument("--memory-limit", default=None, type=memory_limit, metavar="SIZE",
                   help="memory budget per worker: 4GB, 4GiB, 500M (sizes as --out-shard-size) or auto")
    g.add_argument("--dashboard-address", default="127.0.0.1:8787",
                   help="where the Dask dashboard listens (default 127.0.0.1:8787; none: no dashboard)")
    g.add_argument("--no-dashboard", dest="dashboard_address", action="store_const", const="none",
                   help="start no dashboard (the same as --dashboard-address none)")
    g.add_argument("--device", default=None, help="where merge ops run: cpu (default), cuda (one process "
                   "worker per GPU when there are several), cuda:N, or auto (cuda if there is one)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted merge in OUT")
    g.add_argument("--force", action="store_true", help="overwrite a non-empty OUT")
    g.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False,
                   help="no progress bar and no dashboard link (default off)")


def _plan_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("planning")
    g.add_argument("--out-shard-size", type=size, default=parse_size("5GB"), metavar="SIZE",
                   help="largest output shard in bytes (default 5GB): mergekit's 5B (= 5e9), 500M, or "
                        "byte units, 4GB = 4e9, 4GiB = 2^32")
    g.add_argument("--random-seed", type=int, default=0, help="seed for random methods (default 0)")
    g.add_argument("--allow-crimes", action="store_true", help="allow merging different architectures")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code from the Hub when loading tokenizers (off by default)")
    g.add_argument("--unsafe-truncate-embeddings", action="store_true",
                   help="without a tokenizer setting, cut embeddings of different vocabulary sizes to "
                        "the smallest (as mergekit; safe only if the models number tokens alike)")


def _mergekit_options(run: argparse.ArgumentParser) -> None:
    """mergekit-yaml's flags (mergekit-multi takes the same), spelt and taking values as
    mergekit-yaml takes them (cli/run.py maps them to mergeflow's options)."""
    on_off = argparse.BooleanOptionalAction
    g = run.add_argument_group("mergekit-yaml's flags", "mergekit-yaml CONFIG OUT [flags] runs as "
                               "mergeflow run CONFIG OUT [flags]; flags marked 'not needed' are accepted and "
                               "print one line saying why")
    g.add_argument("--cuda", action=on_off, default=False, help="= --device cuda")
    g.add_argument("--multi-gpu", action=on_off, default=False, help="every GPU, one worker each (= --device cuda)")
    g.add_argument("--gpu-rich", action="store_true", help="mergekit's --cuda --low-cpu-memory --read-to-gpu "
                   "--multi-gpu: here --device cuda")
    g.add_argument("-j", "--num-threads", type=positive_int, default=None, metavar="N",
                   help="CPU threads for the whole merge, shared by the tasks run at once and torch's "
                        "threads in each (default: every core)")
    g.add_argument("--copy-tokenizer", action=on_off, default=True, help="copy the base (or first) model's "
                   "tokenizer files (default on); a tokenizer the config builds (tokenizer_source, "
                   "tokenizer:) is saved either way")
    g.add_argument("--write-model-card", action=on_off, default=True,
                   help="write README.md (the model card) and mergekit_config.yml (default on)")
    g.add_argument("--safe-serialization", action=on_off, default=True, help="write model*.safetensors "
                   "(default); --no-safe-serialization: pytorch_model*.bin (and pytorch_model.bin.index.json)")
    g.add_argument("--transformers-cache", default=None, metavar="DIR",
                   help="the Hugging Face cache where Hub models are found and downloaded (= HF_HUB_CACHE=DIR)")
    for flag, why in NOT_NEEDED.items():
        name = "--" + flag.replace("_", "-")
        if flag == "lora_merge_cache":
            g.add_argument(name, default=None, metavar="DIR", help=f"not needed: {why}")
        elif flag == "write_threads":
            g.add_argument(name, type=positive_int, default=None, metavar="N", help=f"not needed: {why}")
        else:
            g.add_argument(name, action=on_off, default=False, help=f"not needed: {why}")


def _did_you_mean(argv: list[str]) -> str | None:
    """`mergeflow CONFIG OUT`, typed as one types mergekit-yaml: what to say (None: not that)."""
    words = [a for a in argv if not a.startswith("-")]
    if not words or any(w in COMMANDS for w in words):
        return None
    config = next((w for w in words if w.endswith((".yml", ".yaml")) or os.path.isfile(w)), None)
    if config is None:
        return None
    return (f"mergeflow: error: {config!r} is not a command. mergekit-yaml CONFIG OUT is "
            f"`mergeflow run CONFIG OUT` here; did you mean `{shlex.join(['mergeflow', 'run', *argv])}`?")


def main(argv: list[str] | None = None) -> int:
    # torch backs CPU tensors of 2 MB and more with transparent huge pages: a merge allocates
    # and frees a tensor-sized buffer per op, and faulting those in 4 KB pages cost as much
    # system time as the merge itself (README, "Speed and memory"). Read by torch at its first
    # allocation, so set before torch is imported; worker processes inherit it.
    os.environ.setdefault(THP_ENV, "1")
    argv = sys.argv[1:] if argv is None else argv
    habit = _did_you_mean(argv)
    if habit:
        print(habit, file=sys.stderr)
        return EXIT_USER_ERROR
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    try:
        with _terminal(verbose, getattr(args, "out", None)):
            return COMMANDS[args.command](args)
    except MergeflowError as e:
        if verbose:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as e:  # a run's MergeInterrupted says how to continue
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
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
            "extract-lora": cmd_extract_lora, "moe": cmd_moe, "multi": cmd_multi}
EPILOG = """mergekit-yaml users: `mergekit-yaml CONFIG OUT [flags]` is `mergeflow run CONFIG OUT [flags]`,
with mergekit-yaml's flags: --cuda, --multi-gpu, --gpu-rich, -j/--num-threads, --out-shard-size
(5B, 4GB, 4GiB), --copy-tokenizer/--no-copy-tokenizer, --write-model-card/--no-write-model-card,
--safe-serialization/--no-safe-serialization, --transformers-cache, --random-seed, --allow-crimes,
--trust-remote-code, --quiet/--no-quiet; --lazy-unpickle, --low-cpu-memory, --read-to-gpu,
--async-write, --write-threads, --clone-tensors and --lora-merge-cache are accepted and not
needed. `mergeflow run --help` describes each; `mergeflow COMMAND --help` every command's flags."""

