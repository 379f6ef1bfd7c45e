"""The output directory around the tensors: checks before, metadata after.

Before the merge: refuse an output that is an input, or non-empty without --force/--resume,
and remove any config.json and index so a half-written output never looks complete. After
it: check every planned tensor is on disk as planned, then write the tokenizer, generation
config, model card and mergeflow_config.yml, and last the index and config.json.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from mergeflow import __version__
from mergeflow.errors import MergeflowError
from mergeflow.exec.journal import STATE_DIR
from mergeflow.output.card import model_card
from mergeflow.plan import MergePlan
from mergeflow.plan.shards import read_header
from mergeflow.plan.vocab import check_output
from mergeflow.sources import architectures as arch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
COMPLETE_MARKERS = ("config.json", "model.safetensors.index.json")


def check_complete(plan: MergePlan, out_dir: Path, done: set[str]) -> None:
    """Every planned tensor is in its shard with the planned header, size and journal entry."""
    problems = []
    for shard in plan.shards:
        path = out_dir / shard.file
        if not path.exists() or path.stat().st_size != shard.size:
            problems.append(f"{shard.file}: missing or of the wrong size")
            continue
        with open(path, "rb") as f:
            if f.read(len(shard.header)) != shard.header:
                problems.append(f"{shard.file}: header differs from the plan")
                continue
        header = read_header(path)
        missing = [t for t in shard.tensors if t not in header]
        if missing:
            problems.append(f"{shard.file}: lacks {missing[0]}")
    unwritten = [t.name for t in plan.tensors if t.name not in done]
    if unwritten:
        problems.append(f"{len(unwritten)} tensor(s) were never written, first {unwritten[0]}")
    if problems:
        raise MergeflowError(f"{out_dir}: the output is incomplete, so no config.json was written: "
                             + "; ".join(problems))


def write_metadata(plan: MergePlan, out_dir: Path, card: str | None = None) -> None:
    """Everything but the tensors; the index and config.json go last. `card`: the model card
    (default: model_card(plan))."""
    ref = Path(plan.models[plan.reference].path)
    for name in TOKENIZER_FILES if plan.tokenizer is None else ():
        if (ref / name).is_file():
            shutil.copyfile(ref / name, output_path(out_dir, name))
    if (ref / "generation_config.json").is_file():
        shutil.copyfile(ref / "generation_config.json", out_dir / "generation_config.json")
    for name, data in plan.tokenizer.files if plan.tokenizer is not None else ():  # built in the plan
        output_path(out_dir, name).write_bytes(data)
    _atomic_write(out_dir / "mergeflow_config.yml", plan.config.text or yaml.safe_dump({}))
    _atomic_write(out_dir / "README.md", model_card(plan) if card is None else card)
    fam = arch.family(plan.out_config)  # a vocabulary that disagrees with its rows fails the run
    check_output(out_dir, plan.out_config, {t.name: t.shape[0] for t in plan.tensors
                                            if arch.is_vocab_tensor(t.name, fam)}, plan.truncated)
    if len(plan.shards) > 1:
        weight_map = {t.name: plan.shards[t.shard].file for t in plan.tensors}
        index = {"metadata": {"total_size": sum(t.nbytes for t in plan.tensors),
                              "mergeflow_version": __version__},
                 "weight_map": weight_map}
        _atomic_write(out_dir / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    _atomic_write(out_dir / "config.json", json.dumps(plan.out_config, indent=2, sort_keys=True) + "\n")


def publish(plan: MergePlan, out_dir: Path, card: str | None = None) -> None:
    """write_metadata; if it fails (disk full, interrupt), leave no config.json, index or
    temporary file behind: the output must not look complete. The journal stays for --resume."""
    try:
        write_metadata(plan, out_dir, card)
    except BaseException as e:
        for name in COMPLETE_MARKERS:
            (out_dir / name).unlink(missing_ok=True)
        for tmp in out_dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            where = f": {e.filename}" if str(e.filename or "").startswith(str(out_dir)) else ""
            raise MergeflowError(f"{out_dir}: writing the metadata failed ({e.strerror or e}{where}); "
                                 "the tensors are written but the output holds no config.json. "
                                 "Fix the cause and rerun with --resume") from e
        raise


def output_path(out_dir: Path, name: str) -> Path:
    """`out_dir / name` for a file name that came from a model or a config: a plain name only,
    so nothing is ever written outside the output directory."""
    if not name or name in (".", "..") or Path(name).name != name or "\\" in name or "\0" in name:
        raise MergeflowError(f"refusing to write {name!r}: not a plain file name inside {out_dir}")
    return out_dir / name


def remove_state(out_dir: Path) -> None:
    shutil.rmtree(out_dir / STATE_DIR, ignore_errors=True)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

