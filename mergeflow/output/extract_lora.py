"""Run a LoRA extraction into an output directory: checks before, the graph, the adapter last.

OUT becomes a PEFT adapter directory: adapter_model.safetensors, extract_lora_report.json (each
LoRA module's rank and reconstruction error), README.md, and adapter_config.json written last,
so an interrupted extraction never looks like an adapter. The output checks, the journal and
--resume are those of a merge (output/prepare.py, exec/journal.py); with --sv-epsilon a first
graph decomposes every module into scratch files, then the file is laid out for the ranks
found and the second graph copies the factors into it (exec/extract_lora.py).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

from mergeflow import __version__
from mergeflow.errors import MergeflowError
from mergeflow.exec import cluster
from mergeflow.exec.extract_lora import (
    FACTORS,
    REPORT,
    extract_graph,
    factor_graph,
    read_records,
    restart_records,
    scratch_path,
)
from mergeflow.exec.journal import STATE_DIR, journal_path, on_disk, read_journal, start_journal
from mergeflow.exec.options import RunOptions
from mergeflow.exec.progress import Progress
from mergeflow.exec.run import _execute, _Where, _where
from mergeflow.exec.write import prepare_shard, replace_file
from mergeflow.output.metadata import check_complete, remove_state
from mergeflow.output.prepare import check_directory, lock_output
from mergeflow.plan.extract_lora import ExtractPlan, adapter_config, layout
from mergeflow.sources.models import read_safetensors_header
from mergeflow.spec.sizes import human_bytes

CONFIG_FILE = "adapter_config.json"  # written last: its presence means a complete adapter
REPORT_FILE = "extract_lora_report.json"


@dataclass(frozen=True)
class ModuleReport:
    module: str
    rank: int
    error: float  # ||delta - B @ A||_F / ||delta||_F of the factors as written


@dataclass(frozen=True)
class ExtractSummary:
    out_dir: Path
    modules: tuple[ModuleReport, ...]
    saved: int  # tensors copied whole (modules_to_save, biases)
    bytes_written: int
    seconds: float

    def table(self) -> str:
        width = max(len(m.module) for m in self.modules)
        rows = [f"{'module':<{width}}  rank  rel. error"]
        rows += [f"{m.module:<{width}}  {m.rank:>4}  {m.error:.3e}" for m in self.modules]
        return "\n".join(rows)

    def text(self) -> str:
        ranks = [m.rank for m in self.modules]
        worst = max(self.modules, key=lambda m: m.error)
        return (f"extracted {len(self.modules)} LoRA modules (rank {min(ranks)}-{max(ranks)}; largest "
                f"relative error {worst.error:.3e}, {worst.module}) and {self.saved} whole tensors "
                f"into {self.out_dir} in {self.seconds:.1f} s ({human_bytes(self.bytes_written)})")


def run_extraction(plan: ExtractPlan, out_dir: str | Path, options: RunOptions | None = None, *,
                   invocation: str = "", write_card: bool = True, log=None) -> ExtractSummary:
    """Write the adapter of `plan` into `out_dir` (see the module docstring)."""
    options = options or RunOptions()
    log = log or (lambda msg: None if options.quiet else print(msg, file=sys.stderr, flush=True))
    out_dir = Path(out_dir).resolve()
    started = time.monotonic()
    where = _where(options)
    check_directory(plan, out_dir, options)  # before anything is made, OUT itself included
    with lock_output(out_dir):
        check_directory(plan, out_dir, options)  # again, now that no other run can change it
        return _extract(plan, out_dir, options, where, log, started, invocation, write_card)


def _extract(plan: ExtractPlan, out_dir: Path, options: RunOptions, where, log, started: float,
             invocation: str, write_card: bool) -> ExtractSummary:
    (out_dir / CONFIG_FILE).unlink(missing_ok=True)
    done = _journaled(plan, out_dir, options.resume)
    start_journal(out_dir, plan.fingerprint, done)
    # the report records to keep: every module's, once all are factorized (--sv-epsilon);
    # else those of the modules whose factors are in the file
    factorized = plan.shard is None
    if factorized:
        plan = _factorize(plan, out_dir, options, where, log)
    done = on_disk(out_dir, plan.shards, done)
    start_journal(out_dir, plan.fingerprint, done)
    restart_records(out_dir, REPORT, {m.name for m in plan.loras} if factorized else
                    {t.module for t in plan.tensors if t.part == "A" and t.name in done})
    _prepare(plan, out_dir, keep=bool(done))
    dsk, keys, finals = extract_graph(plan, out_dir, options.device, done)
    todo = [t for t in plan.tensors if t.name not in done]
    progress = Progress(len(keys), sum(t.nbytes for t in todo), quiet=options.quiet)
    _run(dsk, keys, finals, options, where, progress, log, plan, out_dir)
    finished, _ = read_journal(out_dir, plan.fingerprint)
    check_complete(plan, out_dir, finished)
    reports = _reports(plan, out_dir)
    _publish(plan, out_dir, reports, invocation, write_card)
    remove_state(out_dir)
    return ExtractSummary(out_dir, reports, sum(t.part == "copy" for t in plan.tensors),
                          sum(t.nbytes for t in todo), time.monotonic() - started)


def _journaled(plan: ExtractPlan, out_dir: Path, resume: bool) -> set[str]:
    """The tensors an interrupted run of this plan wrote (--resume; still to be checked
    against the file). Records and scratch factors are kept only with them."""
    done, keep = set(), False
    if resume:
        done, rebooted = read_journal(out_dir, plan.fingerprint)
        keep = journal_path(out_dir).exists() and not rebooted  # scratch files were never synced
        if rebooted:
            warnings.warn(f"the machine restarted since the interrupted extraction into {out_dir}; its "
                          "tensors may not have reached the disk, so all are written again", stacklevel=3)
    if not keep:
        restart_records(out_dir, REPORT, set())
        shutil.rmtree(out_dir / STATE_DIR / FACTORS, ignore_errors=True)
    return done


def _factorize(plan: ExtractPlan, out_dir: Path, options: RunOptions, where: _Where, log) -> ExtractPlan:
    """--sv-epsilon: decompose each module into its scratch file (those an interrupted run
    finished are kept), then lay the adapter out for the ranks found."""
    (out_dir / STATE_DIR / FACTORS).mkdir(parents=True, exist_ok=True)
    scratch = {m.name: scratch_path(out_dir, plan, m.name) for m in plan.loras}
    dsk, keys, finals = factor_graph(plan, out_dir, options.device, {n for n, p in scratch.items() if p.exists()})
    if keys:
        log(f"decomposing {len(keys)} weights, keeping singular values above --sv-epsilon "
            f"{plan.options.sv_epsilon}")
        todo = [m for m in plan.loras if not scratch[m.name].exists()]
        progress = Progress(len(keys), sum(m.weight.nbytes + m.base.nbytes for m in todo), quiet=options.quiet)
        _run(dsk, keys, finals, options, where, progress, log, plan, out_dir)
    factors = {}
    for m in plan.loras:
        header = read_safetensors_header(scratch[m.name])
        a, b = header["A"], header["B"]
        rows, cols = m.delta_shape
        if a.shape != (a.shape[0], cols) or b.shape != (rows, a.shape[0]):
            raise MergeflowError(f"{scratch[m.name]}: factors of {m.name} of the wrong shape; rerun without "
                                 "--resume (with --force)")
        factors[m.name] = (a, b)
    ranks = {name: a.shape[0] for name, (a, _) in factors.items()}
    if not any(ranks.values()):
        raise MergeflowError(f"no singular value of any weight's change is above --sv-epsilon "
                             f"{plan.options.sv_epsilon}: the adapter would be empty; lower it")
    return layout(plan, ranks, factors)


def _run(dsk, keys, finals, options: RunOptions, where: _Where, progress: Progress, log,
         plan: ExtractPlan, out_dir: Path) -> None:
    try:
        _execute(dsk, keys, finals, options, where, progress, log,
                 lambda client: _check_cluster(client, where, plan, out_dir, options))
    except KeyboardInterrupt:
        raise MergeflowError(f"interrupted; {out_dir} is not a complete adapter (no {CONFIG_FILE}). "
                             "Rerun the same command with --resume to continue") from None
    except MergeflowError as e:
        raise MergeflowError(f"{e}\nThe extraction stopped; {out_dir} holds no {CONFIG_FILE}. Fix the "
                             "cause and rerun with --resume to keep finished tensors") from None


def _prepare(plan: ExtractPlan, out_dir: Path, keep: bool) -> None:
    """The adapter's file with its header; kept as it is when it holds finished tensors."""
    try:
        prepare_shard(out_dir / plan.shard.file, plan.shard, keep=keep)
    except OSError as e:
        raise MergeflowError(f"cannot create {out_dir / plan.shard.file} ({human_bytes(plan.shard.size)}): "
                             f"{e.strerror or e}; no tensor was read") from None


def _check_cluster(client, where: _Where, plan: ExtractPlan, out_dir: Path, options: RunOptions) -> None:
    """An existing cluster's workers must see both models and the output directory."""
    if not where.address:
        return
    files = [f for model in plan.models for f in model.files()]
    writable = [str(out_dir / s.file) for s in plan.shards] + [str(journal_path(out_dir).parent)]
    writable += [str(out_dir / STATE_DIR / FACTORS)] if plan.shard is None else []
    cluster.check_workers(client, where.address, cluster.input_files(files), out_dir, writable,
                          options.device)


def _reports(plan: ExtractPlan, out_dir: Path) -> tuple[ModuleReport, ...]:
    """Each LoRA module's rank and error, in module order (a rank of 0: no LoRA, all lost)."""
    records = read_records(out_dir, REPORT)
    return tuple(ModuleReport(m.name, records[m.name]["rank"], records[m.name]["error"]) for m in plan.loras)


def _publish(plan: ExtractPlan, out_dir: Path, reports: tuple[ModuleReport, ...], invocation: str,
             write_card: bool) -> None:
    """The report and the card, then adapter_config.json last; if any fails, no
    adapter_config.json or temporary file is left (the journal stays for --resume)."""
    try:
        _write_metadata(plan, out_dir, reports, invocation, write_card)
    except BaseException as e:
        (out_dir / CONFIG_FILE).unlink(missing_ok=True)
        for tmp in out_dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise MergeflowError(f"{out_dir}: writing the adapter's metadata failed ({e.strerror or e}); "
                                 f"the tensors are written but there is no {CONFIG_FILE}. Fix the "
                                 "cause and rerun with --resume") from e
        raise


def _write_metadata(plan: ExtractPlan, out_dir: Path, reports: tuple[ModuleReport, ...],
                    invocation: str, write_card: bool) -> None:
    report = {"mergeflow_version": __version__, "finetune": plan.finetune.label, "base": plan.base.label,
              "max_rank": plan.options.max_rank, "sv_epsilon": plan.options.sv_epsilon,
              "modules": [{"module": r.module, "rank": r.rank, "relative_error": r.error}
                          for r in reports],
              "modules_to_save": list(plan.modules_to_save)}
    replace_file(out_dir / REPORT_FILE, (json.dumps(report, indent=2) + "\n").encode())
    if write_card:
        replace_file(out_dir / "README.md", adapter_card(plan, reports, invocation).encode())
    replace_file(out_dir / CONFIG_FILE, (json.dumps(adapter_config(plan), indent=2) + "\n").encode())


def adapter_card(plan: ExtractPlan, reports: tuple[ModuleReport, ...], invocation: str) -> str:
    """README.md for the Hub: the base as `base_model` when it is a Hub id, how it was made."""
    base = plan.base.ref
    hub = not Path(base.path).expanduser().exists() and base.path.count("/") == 1
    front = {"base_model": [base.path] if hub else [], "library_name": "peft",
             "tags": ["mergeflow", "peft", "lora"]}
    by_key: dict[str, list[ModuleReport]] = {}
    for r in reports:
        by_key.setdefault(r.module.rsplit(".", 1)[-1], []).append(r)
    rows = "\n".join(f"| {k} | {len(rs)} | {min(r.rank for r in rs)}-{max(r.rank for r in rs)} | "
                     f"{max(r.error for r in rs):.2e} |" for k, rs in by_key.items())
    saved = ", ".join(f"`{m}`" for m in plan.modules_to_save) or "none"
    notes = "".join(f"- {n}\n" for n in plan.notes)
    return (f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n# {Path(str(plan.finetune.ref.path)).name} "
            f"(LoRA)\n\nA LoRA adapter extracted with [mergeflow](https://pypi.org/project/mergeflow/) "
            f"{__version__}: the difference between `{plan.finetune.label}` and its base `{plan.base.label}`, "
            f"as a truncated SVD of each weight's change (at most rank {plan.options.max_rank}).\n\n"
            f"| module | count | rank | largest relative error |\n|---|---:|---:|---:|\n{rows}\n\n"
            f"Saved whole (`modules_to_save`): {saved}. Each module's rank and error: "
            f"`{REPORT_FILE}`.\n\n{notes}\n## Command\n\n```sh\n{invocation}\n```\n")
