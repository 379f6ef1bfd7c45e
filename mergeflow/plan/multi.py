"""Plan a multi-stage merge: every stage planned and checked before any tensor is read.

Each document of the file (spec/multi.py) is a stage. A model reference whose path is a
stage's name means that stage's result, wherever a model may stand (models, slices, base
models, tokenizer sources, token sources), as in mergekit-multi. The stages are planned in
dependency order; a cycle, or a reference that is neither a stage nor a model, is an error
naming the document and its line.

A stage's result looks, to the stages after it, like the model it would write: a StageModel
(sources/stage.py) with its planned tensors (renumbered layers, output dtypes), its
out_config as config.json and its tokenizer files, in a directory of `workdir` that holds
those small files and no weights (`stage_files`: what write_metadata writes). So tokenizers,
chat templates and layer counts propagate as they do when each stage runs on the previous
one's output directory. Then:
- without an intermediate directory, an input read from a stage becomes that stage's tensor,
  computed where it is read (plan.Stage: nothing of it is written);
- with one (`-I DIR`), every named stage is written to DIR/<name> as a full model, and later
  stages read its shards there (the run orders those reads after the writes); a stage
  already complete there is read as it is (`lazy`, mergekit-multi's default).
Each stage's fingerprint covers the stages it reads, so a change anywhere upstream shows.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from mergeflow.dtypes import TORCH_TO_CODE
from mergeflow.errors import MergeflowError
from mergeflow.plan.planner import Input, MergePlan, Stage, plan_merge
from mergeflow.plan.tokenizer import TOKENIZER_FILES
from mergeflow.sources.lora import attach_lora
from mergeflow.sources.models import TensorInfo, adapter_ref, read_tensor_index, resolve_model_path
from mergeflow.sources.stage import StageModel
from mergeflow.spec.config import MergeConfig, ModelRef
from mergeflow.spec.multi import Document, MultiConfig

COMPLETE = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json")  # with config.json: a finished model (mergekit-multi's test)


@dataclass(frozen=True)
class StagePlan:
    document: Document
    plan: MergePlan  # inputs from earlier stages: plan.Stage inputs, or their files with -I
    reads: tuple[str, ...]  # the stages whose results it reads
    out_dir: Path | None  # where it is written (OUT, or DIR/<name> with -I); None: computed only

    @property
    def name(self) -> str | None:
        return self.document.name


@dataclass(frozen=True)
class MultiPlan:
    config: MultiConfig
    stages: tuple[StagePlan, ...]  # each after the stages it reads
    reused: tuple[tuple[str, Path], ...] = ()  # (stage, directory): complete in -I, read as they are
    warnings: tuple[str, ...] = ()

    @property
    def output(self) -> StagePlan:
        return next(s for s in self.stages if s.document is self.config.output)

    @property
    def written(self) -> tuple[StagePlan, ...]:
        return tuple(s for s in self.stages if s.out_dir is not None)

    def stage(self, name: str | None) -> StagePlan:
        return next(s for s in self.stages if s.name == name)


def plan_multi(multi: MultiConfig, workdir: str | Path, *, out_dir: str | Path | None = None,
               intermediate_dir: str | Path | None = None, lazy: bool = True,
               out_shard_size: int = 5_000_000_000, random_seed: int = 0, allow_crimes: bool = False,
               allow_download: bool = True, trust_remote_code: bool = False,
               unsafe_truncate_embeddings: bool = False) -> MultiPlan:
    """Plan every stage from headers alone; raise MergeflowError naming the document and line.

    `workdir`: an empty directory for the stages' small files (sources/stage.py), needed until
    the run has written its metadata. `out_dir`: OUT, where the output document goes (without
    it, -I is required and every document must be named: all go to DIR/<name>)."""
    inter = Path(intermediate_dir).resolve() if intermediate_dir is not None else None
    deps = _dependencies(multi, inter)
    targets = _targets(multi, out_dir, inter)
    reused = {d.name: inter / d.name for d in multi.documents if inter is not None and lazy
              and d.name is not None and d is not multi.output and complete(inter / d.name)}
    order = _order(multi, deps, [d.name for d in targets], set(reused))
    reused = {n: d for n, d in reused.items() if any(n in deps[s] for s in order)}  # those read
    warnings = [f"{d.title} is not read by the output and is not merged; give --intermediate-dir to "
                "write every stage" for d in multi.documents if d.name not in order and d.name not in reused]
    options = dict(out_shard_size=out_shard_size, random_seed=random_seed, allow_crimes=allow_crimes,
                   allow_download=allow_download, trust_remote_code=trust_remote_code,
                   unsafe_truncate_embeddings=unsafe_truncate_embeddings)
    built: dict[str, StagePlan] = {}
    models: dict[str, StageModel] = {}
    stages = []
    for name in order:
        doc = multi.document(name)
        where = (Path(out_dir).resolve() if out_dir is not None and doc is multi.output
                 else inter / name if inter is not None else None)
        plan = _plan_stage(doc, deps[name], models, reused, inter, built, options)
        stage = StagePlan(doc, plan, tuple(sorted(deps[name])), where)
        built[name] = stage
        stages.append(stage)
        if name is not None:
            models[name] = stage_model(name, plan, Path(workdir) / name, where)
            write_files(Path(workdir) / name, stage_files(plan))
    return MultiPlan(multi, tuple(stages), tuple(sorted(reused.items())),
                     tuple(dict.fromkeys(w for s in stages for w in s.plan.warnings)) + tuple(warnings))


def complete(directory: Path) -> bool:
    """A finished model directory: config.json (written last) and its weights."""
    return (directory / "config.json").is_file() and any((directory / f).is_file() for f in COMPLETE)


# ----------------------------------------------------------------------------- references


def references(config: MergeConfig) -> Iterator[tuple[tuple, ModelRef]]:
    """(YAML location, reference) of every model reference in the config."""
    yield from _walk(config, ())


def _walk(value: Any, loc: tuple) -> Iterator[tuple[tuple, ModelRef]]:
    if isinstance(value, ModelRef):
        yield loc, value
    elif isinstance(value, BaseModel):
        for field in type(value).model_fields:
            if field not in ("path", "text", "positions"):
                yield from _walk(getattr(value, field), loc + (field,))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _walk(item, loc + (i,))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, loc + (key,))


def rewrite(value: Any, swap) -> Any:
    """`value` (a config or part of one) with every ModelRef r replaced by swap(r)."""
    if isinstance(value, ModelRef):
        return swap(value)
    if isinstance(value, BaseModel):
        changed = {}
        for field in type(value).model_fields:
            if field not in ("path", "text", "positions"):
                old = getattr(value, field)
                new = rewrite(old, swap)
                if new is not old:
                    changed[field] = new
        return value.model_copy(update=changed) if changed else value
    if isinstance(value, list):
        new = [rewrite(v, swap) for v in value]
        return new if any(a is not b for a, b in zip(new, value)) else value
    if isinstance(value, dict):
        new = {k: rewrite(v, swap) for k, v in value.items()}
        return new if any(new[k] is not value[k] for k in value) else value
    return value


def _dependencies(multi: MultiConfig, inter: Path | None) -> dict[str | None, set[str]]:
    """The stages each document reads; every problem with a reference, then cycles, at once."""
    names = set(multi.names)
    deps: dict[str | None, set[str]] = {}
    problems = []
    for doc in multi.documents:
        deps[doc.name] = set()
        for loc, ref in references(doc.config):
            where = doc.config.where(loc)
            if ref.path in names:
                deps[doc.name].add(ref.path)
                if ref.revision:
                    problems.append(f"{where}: `{ref}` names stage `{ref.path}` with a revision; a stage's "
                                    f"result has none: write `{ref.path}`")
                if ref.lora and inter is None:
                    problems.append(f"{where}: `{ref}` applies an adapter to stage `{ref.path}`, whose tensors "
                                    "are computed in the graph; give --intermediate-dir to write the stage "
                                    "so its tensors are files the adapter can be applied to")
            elif (problem := _unknown(ref, multi)) is not None:
                problems.append(f"{where}: {problem}")
    problems += _cycles(multi, deps)
    if problems:
        raise MergeflowError(f"{multi.path}: {len(problems)} problem(s) with the stages (no model was read):\n"
                             + "\n".join(f"  - {p}" for p in problems))
    return deps


def _unknown(ref: ModelRef, multi: MultiConfig) -> str | None:
    """Why `ref` is neither a stage nor a model, when that is sure without reading anything:
    no such local path and close to a stage's name, or not a Hub id either."""
    if Path(ref.path).expanduser().exists():
        return None
    names = list(multi.names)
    close = difflib.get_close_matches(ref.path, names, n=1, cutoff=0.6)
    hub_like = not ref.path.startswith((".", "/", "~")) and ref.path.count("/") == 1
    if not close and hub_like:
        return None  # a Hub id, perhaps in the cache: the planner looks it up
    stages = ", ".join(f"`{n}`" for n in names) or "none"
    hint = f"; did you mean `{close[0]}`?" if close else ""
    return (f"`{ref.path}` is neither a stage of this file (its stages: {stages}) nor a model directory"
            f"{hint}")


def _cycles(multi: MultiConfig, deps: dict[str | None, set[str]]) -> list[str]:
    """One problem per cycle of stages reading each other, at the reference that closes it."""
    state: dict[str | None, str] = {}
    problems: list[str] = []

    def visit(name: str | None, path: list[str | None]) -> None:
        state[name] = "open"
        for dep in sorted(deps[name]):
            if state.get(dep) == "open":
                cycle = path[path.index(dep):] + [dep] if dep in path else [name, dep]
                doc = multi.document(name)
                loc = next(loc for loc, ref in references(doc.config) if ref.path == dep)
                chain = " -> ".join(f"`{n}`" for n in cycle)
                problems.append(f"{doc.config.where(loc)}: stage `{dep}` is read by a stage it reads itself "
                                f"({chain}): a cycle; each stage may only read stages that do not read it")
            elif dep not in state:
                visit(dep, path + [dep])
        state[name] = "done"

    for doc in multi.documents:
        if doc.name not in state:
            visit(doc.name, [doc.name])
    return problems


def _targets(multi: MultiConfig, out_dir, inter: Path | None) -> list[Document]:
    """The documents to write: the output (to OUT), and with -I every named one."""
    out = multi.output
    if out_dir is None and inter is None:
        raise MergeflowError("give the output directory OUT (or --out-path), or --intermediate-dir to write "
                             "every stage there")
    if out_dir is None and out.name is None:
        raise MergeflowError(f"{out.title} has no name, so it needs an output directory: give OUT "
                             "(or --out-path), as mergekit-multi needs --out-path")
    return [d for d in multi.documents if d is out or (inter is not None and d.name is not None)]


def _order(multi: MultiConfig, deps, targets: list[str | None], reused: set[str]) -> list[str | None]:
    """The stages to plan, each after those it reads (a reused stage is read from its files)."""
    order: list[str | None] = []

    def visit(name: str | None) -> None:
        if name in order:
            return
        for dep in sorted(deps[name]):
            if dep not in reused:
                visit(dep)
        order.append(name)

    for doc in multi.documents:
        if doc.name in targets and doc.name not in reused:
            visit(doc.name)
    return order


# ----------------------------------------------------------------------------- one stage


def _plan_stage(doc: Document, reads: set[str], models: dict[str, StageModel], reused: dict[str, Path],
                inter: Path | None, built: dict[str, StagePlan], options: dict) -> MergePlan:
    """The stage's plan, with its references to stages swapped for their results."""
    known: dict[str, StageModel] = {}

    def swap(ref: ModelRef) -> ModelRef:
        if ref.path not in reads:
            return ref
        if ref.path in reused:
            return ModelRef(str(reused[ref.path]), None, ref.lora, ref.lora_revision)
        model = models[ref.path]
        new = ModelRef(model.path, None, ref.lora, ref.lora_revision)
        if str(new) not in known:
            known[str(new)] = _with_adapter(model, ref) if ref.lora else model
        return new

    config = rewrite(doc.config, swap)
    try:
        plan = plan_merge(config, models=known, **options)
    except MergeflowError as e:
        raise MergeflowError(f"{doc.title}: {e}") from None
    fingerprint = _fingerprint(plan, {n: built[n].plan.fingerprint for n in reads if n in built},
                               inter is not None)
    plan = dataclasses.replace(plan, fingerprint=fingerprint)
    return plan if inter is not None else chained(plan, {n: built[n] for n in reads if n in built})


def _with_adapter(model: StageModel, ref: ModelRef) -> StageModel:
    """A stage written to -I with `+adapter`: the adapter applied to its tensors when read."""
    adapter = adapter_ref(ref)
    directory = resolve_model_path(adapter, what="adapter")
    return dataclasses.replace(model, tensors=attach_lora(model.tensors, directory, str(adapter), read_tensor_index))


def _fingerprint(plan: MergePlan, upstream: dict[str, str], written: bool) -> str:
    h = hashlib.sha256(json.dumps([plan.fingerprint, sorted(upstream.items()), written]).encode())
    return h.hexdigest()[:32]


def chained(plan: MergePlan, stages: dict[str, StagePlan]) -> MergePlan:
    """`plan` with every input read from a stage's result replaced by that stage's tensor,
    computed in the graph (plan.Stage)."""
    by_name = {n: {t.name: t for t in s.plan.tensors} for n, s in stages.items()}

    def swap(inp: Input | None) -> Input | None:
        model = plan.models[inp.model] if inp is not None else None
        if not isinstance(model, StageModel) or model.stage not in stages:
            return inp
        tensor = by_name[model.stage][inp.tensor.name]
        return dataclasses.replace(inp, stage=Stage(model.stage, stages[model.stage].plan, tensor))

    tensors = tuple(dataclasses.replace(t, inputs=tuple(swap(i) for i in t.inputs), base=swap(t.base))
                    for t in plan.tensors)
    return dataclasses.replace(plan, tensors=tensors)


# ----------------------------------------------------------------------------- the stage as a model


def stage_model(name: str, plan: MergePlan, files_dir: Path, out_dir: Path | None) -> StageModel:
    """Stage `name`'s result as a model: its tensors where its shards put them (in `out_dir`
    when it is written there; otherwise named after the stage, never opened)."""
    tensors = {}
    for t in plan.tensors:
        shard = plan.shards[t.shard].file
        file = str(out_dir / shard) if out_dir is not None else f"{name}/{shard}"
        tensors[t.name] = TensorInfo(t.name, file, TORCH_TO_CODE[t.out_dtype], tuple(t.shape), t.begin, t.end)
    return StageModel(ModelRef(str(files_dir)), str(files_dir), plan.out_config, tensors,
                      str(files_dir / "config.json"), stage=name)


def stage_files(plan: MergePlan) -> dict[str, bytes]:
    """The small files the stage's output directory gets (as output/metadata.py writes them):
    config.json, generation_config.json and the tokenizer files."""
    ref = Path(plan.models[plan.reference].path)
    files = {}
    for name in (TOKENIZER_FILES if plan.tokenizer is None else ()) + ("generation_config.json",):
        if (ref / name).is_file():
            files[name] = (ref / name).read_bytes()
    files.update(plan.tokenizer.files if plan.tokenizer is not None else ())
    files["config.json"] = (json.dumps(plan.out_config, indent=2, sort_keys=True) + "\n").encode()
    return files


def write_files(directory: Path, files: dict[str, bytes]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
