"""The output directory's files besides the tensors, written after them.

After the merge: check every planned tensor is on disk as planned, then write the tokenizer,
generation config, model card (README.md) and the config (mergekit_config.yml, the name Hub
tools and mergekit users look for), and last the index and config.json. Every file is
replaced whole (exec/write.py: a new file renamed over the name), so a symlink in OUT is
replaced, never written through. `is_finished` tells an OUT that already holds this merge.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from mergeflow import __version__
from mergeflow.errors import MergeflowError
from mergeflow.exec.journal import STATE_DIR, has_journal, on_disk
from mergeflow.exec.options import RunOptions
from mergeflow.exec.write import replace_file
from mergeflow.output.bin import BIN_INDEX, write_bin
from mergeflow.output.card import model_card
from mergeflow.plan import MergePlan
from mergeflow.plan.shards import read_header
from mergeflow.plan.tokenizer import tokenizer_setting
from mergeflow.plan.vocab import check_output
from mergeflow.sources import architectures as arch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
COMPLETE_MARKERS = ("config.json", "model.safetensors.index.json", BIN_INDEX)
CONFIG_FILE = "mergekit_config.yml"


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


def write_metadata(plan: MergePlan, out_dir: Path, options: RunOptions | None = None,
                   card: str | None = None) -> None:
    """Everything but the tensors; the index and config.json go last. `card`: the model card
    (default: model_card(plan))."""
    options = options or RunOptions()
    ref = Path(plan.models[plan.reference].path)
    # --no-copy-tokenizer: as in mergekit, a tokenizer the config builds is saved all the same
    save_tokenizer = options.copy_tokenizer or tokenizer_setting(plan.config) is not None
    for name in TOKENIZER_FILES if plan.tokenizer is None and save_tokenizer else ():
        if (ref / name).is_file():
            replace_file(output_path(out_dir, name), (ref / name).read_bytes())
    if (ref / "generation_config.json").is_file():
        replace_file(out_dir / "generation_config.json", (ref / "generation_config.json").read_bytes())
    for name, data in plan.tokenizer.files if plan.tokenizer is not None and save_tokenizer else ():
        replace_file(output_path(out_dir, name), data)
    if options.write_model_card:  # mergekit's flag covers its mergekit_config.yml too
        replace_file(out_dir / CONFIG_FILE, config_text(plan).encode())
        replace_file(out_dir / "README.md", (model_card(plan) if card is None else card).encode())
    fam = arch.family(plan.out_config)  # a vocabulary that disagrees with its rows fails the run
    check_output(out_dir, plan.out_config, {t.name: t.shape[0] for t in plan.tensors
                                            if arch.is_vocab_tensor(t.name, fam)}, plan.truncated)
    if not options.safe_serialization:
        write_bin(plan, out_dir)
    elif len(plan.shards) > 1:
        replace_file(out_dir / "model.safetensors.index.json", index_json(plan))
    replace_file(out_dir / "config.json", config_json(plan))


def config_text(plan: MergePlan) -> str:
    return plan.config.text or yaml.safe_dump({})


def config_json(plan: MergePlan) -> bytes:
    return (json.dumps(plan.out_config, indent=2, sort_keys=True) + "\n").encode()


def index_json(plan: MergePlan) -> bytes:
    weight_map = {t.name: plan.shards[t.shard].file for t in plan.tensors}
    index = {"metadata": {"total_size": sum(t.nbytes for t in plan.tensors), "mergeflow_version": __version__},
             "weight_map": weight_map}
    return (json.dumps(index, indent=2) + "\n").encode()


def is_finished(plan: MergePlan, out_dir: Path) -> bool:
    """Whether OUT holds this plan's merge, finished: config.json, the config and (when
    sharded) the index as this plan writes them, every shard intact, no journal."""
    expected = {"config.json": config_json(plan), CONFIG_FILE: config_text(plan).encode()}
    if len(plan.shards) > 1:
        expected["model.safetensors.index.json"] = index_json(plan)
    for name, data in expected.items():
        path = out_dir / name
        if path.is_symlink() or not path.is_file() or path.read_bytes() != data:
            return False
    every = {t for s in plan.shards for t in s.tensors}
    return not has_journal(out_dir) and on_disk(out_dir, plan.shards, every) == every


def publish(plan: MergePlan, out_dir: Path, options: RunOptions | None = None, card: str | None = None) -> None:
    """write_metadata; if it fails (disk full, interrupt), leave no config.json, index or
    temporary file behind: the output must not look complete. The journal stays for --resume."""
    try:
        write_metadata(plan, out_dir, options, card)
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
    """Remove the state directory (journal, Dask's log): the merge is complete."""
    state = out_dir / STATE_DIR
    if state.is_symlink():
        state.unlink()
    shutil.rmtree(state, ignore_errors=True)
