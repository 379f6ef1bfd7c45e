"""Run a MoEPlan into an output directory: the same checks, journal, resume and "config.json
last" as run_merge (output/merge.py), with mergeflow moe's graph and metadata.

The output: the shards, the base's tokenizer and generation config, a model card and
mergeflow_moe_config.yml (unless turned off), the index when there are several shards, and
config.json (the MoE's, as mergekit-moe writes it) last.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from mergeflow import __version__
from mergeflow.errors import MergeflowError
from mergeflow.exec import cluster
from mergeflow.exec.journal import journal_path, read_journal
from mergeflow.exec.moe import build_moe_graph
from mergeflow.exec.options import RunOptions
from mergeflow.exec.progress import Progress
from mergeflow.exec.run import _execute, _where, worker_budget
from mergeflow.exec.write import replace_file
from mergeflow.output.merge import MergeInterrupted, RunSummary, _unfinished
from mergeflow.output.metadata import COMPLETE_MARKERS, TOKENIZER_FILES, output_path, remove_state
from mergeflow.output.prepare import OutputState, lock_output, output_state, prepare_output
from mergeflow.plan.moe import MoEPlan
from mergeflow.plan.vocab import check_output

CONFIG_COPY = "mergeflow_moe_config.yml"


def run_moe(plan: MoEPlan, out_dir: str | Path, options: RunOptions | None = None, log=None, *,
            copy_tokenizer: bool = True, model_card: bool = True) -> RunSummary:
    """Build the MoE of `plan` in `out_dir`: the checks, lock, journal and resume of run_merge."""
    options = options or RunOptions()
    out_dir = Path(out_dir).resolve()
    started = time.monotonic()
    where = _where(options)
    output_state(plan, out_dir, options)  # before anything is made, OUT itself included
    with lock_output(out_dir):
        state = output_state(plan, out_dir, options)  # again, now that no other run can change it
        return _run(plan, out_dir, options, where, state, log, started, copy_tokenizer, model_card)


def _run(plan: MoEPlan, out_dir: Path, options: RunOptions, where, state: OutputState, log, started: float,
         copy_tokenizer: bool, model_card: bool) -> RunSummary:
    done = state.done
    dsk, writes, finals = build_moe_graph(plan, out_dir, device=options.device, skip=done,
                                          budget=worker_budget(options, where))
    sizes = {t.name: t.nbytes for t in plan.copies} | {w.name: w.nbytes for w in plan.writes}
    todo = [name for name in plan.parts if name not in done]
    progress = Progress(len(todo), sum(sizes[n] for n in todo), quiet=options.quiet)
    log = log or (lambda msg: None if options.quiet else progress.write(msg))
    headers: list[int] = []

    def ready(client) -> None:  # the scheduler is up: its last checks, then the first writes
        _check_cluster(client, where.address, plan, out_dir, options)
        headers.append(prepare_output(plan, out_dir, state))

    try:
        dashboard, peak = _execute(dsk, writes, finals, options, where, progress, log, ready)
    except KeyboardInterrupt:
        raise MergeInterrupted(_unfinished(out_dir, headers, options)) from None
    except MergeflowError as e:
        raise MergeflowError(f"{e}\nThe MoE stopped; {_unfinished(out_dir, headers, options)}") from None
    finished, _ = read_journal(out_dir, plan.fingerprint)
    check_complete(plan, out_dir, finished)
    publish(plan, out_dir, copy_tokenizer=copy_tokenizer, model_card=model_card)
    remove_state(out_dir)
    left = set(todo)
    read = sum(i.tensor.nbytes for t in plan.copies if t.name in left for i in t.inputs)
    read += sum(w.input.tensor.nbytes for w in plan.writes if w.name in left and w.input is not None)
    return RunSummary(out_dir, len(todo), len(plan.parts) - len(todo), read,
                      sum(sizes[n] for n in todo) + sum(headers), time.monotonic() - started, peak, dashboard)


def _check_cluster(client, address: str | None, plan: MoEPlan, out_dir: Path, options: RunOptions) -> None:
    """An existing cluster's workers must see the inputs (and the base's directory, read by
    the gate task) and the output."""
    if not address:
        return
    files = [i.tensor.file for t in plan.copies for i in t.inputs]
    files += [w.input.tensor.file for w in plan.writes if w.input is not None]
    files += [str(f) for f in Path(plan.gates.base).iterdir() if f.is_file()]
    writable = [str(out_dir / s.file) for s in plan.shards] + [str(journal_path(out_dir).parent)]
    cluster.check_workers(client, address, cluster.input_files(files), out_dir, writable, options.device)


def check_complete(plan: MoEPlan, out_dir: Path, done: set[str]) -> None:
    """Every shard has its planned size and header, and every part is in the journal."""
    problems = []
    for shard in plan.shards:
        path = out_dir / shard.file
        if not path.exists() or path.stat().st_size != shard.size:
            problems.append(f"{shard.file}: missing or of the wrong size")
            continue
        with open(path, "rb") as f:
            if f.read(len(shard.header)) != shard.header:
                problems.append(f"{shard.file}: header differs from the plan")
    unwritten = [name for name in plan.parts if name not in done]
    if unwritten:
        problems.append(f"{len(unwritten)} part(s) were never written, first {unwritten[0]}")
    if problems:
        raise MergeflowError(f"{out_dir}: the output is incomplete, so no config.json was written: "
                             + "; ".join(problems))


def publish(plan: MoEPlan, out_dir: Path, *, copy_tokenizer: bool, model_card: bool) -> None:
    """Everything but the tensors, config.json last; if that fails, nothing that makes the
    output look complete is left (the journal stays for --resume)."""
    try:
        _write_metadata(plan, out_dir, copy_tokenizer, model_card)
    except BaseException as e:
        for name in COMPLETE_MARKERS:
            (out_dir / name).unlink(missing_ok=True)
        for tmp in out_dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise MergeflowError(f"{out_dir}: writing the metadata failed ({e.strerror or e}); the "
                                 "tensors are written but the output holds no config.json. Fix the "
                                 "cause and rerun with --resume") from e
        raise


def _write_metadata(plan: MoEPlan, out_dir: Path, copy_tokenizer: bool, model_card: bool) -> None:
    base = Path(plan.gates.base)
    for name in TOKENIZER_FILES if copy_tokenizer else ():
        if (base / name).is_file():
            replace_file(output_path(out_dir, name), (base / name).read_bytes())
    if (base / "generation_config.json").is_file():
        replace_file(out_dir / "generation_config.json", (base / "generation_config.json").read_bytes())
    if model_card:
        replace_file(out_dir / CONFIG_COPY, (plan.config.text or yaml.safe_dump({})).encode())
        replace_file(out_dir / "README.md", card(plan).encode())
    if copy_tokenizer:  # an embedding that disagrees with the saved tokenizer fails the run
        check_output(out_dir, json.loads(plan.out_config), dict(plan.vocab_rows))
    if len(plan.shards) > 1:
        weight_map = {name: s.file for s in plan.shards for name in _header_names(s.header)}
        index = {"metadata": {"total_size": sum(s.size - len(s.header) for s in plan.shards),
                              "mergeflow_version": __version__}, "weight_map": weight_map}
        replace_file(out_dir / "model.safetensors.index.json", (json.dumps(index, indent=2) + "\n").encode())
    replace_file(out_dir / "config.json", plan.out_config.encode())


def _header_names(header: bytes) -> list[str]:
    return [k for k in json.loads(header[8:]) if k != "__metadata__"]


def card(plan: MoEPlan) -> str:
    """The model card: front matter for the Hub, the experts, the config."""
    cfg = plan.config
    front = {"base_model": [str(cfg.base_model)], "library_name": "transformers",
             "tags": ["merge", "mergeflow", "moe"]}
    experts = "\n".join(f"- `{e.source_model}`" for e in cfg.experts)
    shared = "".join(f"\nShared expert: `{e.source_model}`\n" for e in cfg.shared_experts or [])
    return (f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n# Mixture of experts\n\nThis "
            f"{plan.architecture} model was assembled with [mergeflow](https://pypi.org/project/mergeflow/) "
            f"{__version__} (`mergeflow moe`) from `{cfg.base_model}` and {len(cfg.experts)} experts, "
            f"{cfg.experts_per_token} per token, with `{cfg.gate_mode}` routers.\n\n## Experts\n\n"
            f"{experts}\n{shared}\n## Configuration\n\n```yaml\n{cfg.text.strip()}\n```\n")
