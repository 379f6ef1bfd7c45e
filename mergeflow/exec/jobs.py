"""The job records between the plan and the tasks: typed, frozen, plain data that pickles.

A TensorJob is everything a task needs to merge one output tensor: where each input's bytes
are (and how to cut, adapt or re-index them), the method with its resolved parameters, the
dtypes, the output range, the journal, the device, and how to run (chunk size, whether to
read the inputs once and keep them, the row blocks). `jobs(plan, ...)` makes one per tensor.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from mergeflow.dtypes import CODE_TO_TORCH, DTYPE_BYTES, TORCH_TO_CODE, torch_dtype
from mergeflow.methods import REGISTRY
from mergeflow.methods.draws import stream_keys
from mergeflow.methods.passes import Layout, Meta, Program
from mergeflow.plan import MergePlan, TensorPlan
from mergeflow.plan.vocab import VocabAlign
from mergeflow.sources.tensors import LoraDelta


@dataclass(frozen=True)
class Source:
    """One input of one tensor: its stored bytes, cut to `crop`, plus a LoRA delta; or, with
    `producer`, the output of an earlier stage's job, computed rows by rows (never stored)."""

    label: str  # the model (or stage), for messages
    file: str
    tensor: str  # its name in the file (or in the stage's output)
    dtype: str  # safetensors code as stored (a producer: of its output dtype)
    shape: tuple[int, ...]  # as stored
    begin: int = 0  # absolute byte offset in `file` (safetensors)
    crop: tuple[int, ...] | None = None
    lora: LoraDelta | None = None
    producer: TensorJob | None = None

    @property
    def row_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype] * math.prod(self.shape[1:]) if self.shape else DTYPE_BYTES[self.dtype]

    @property
    def nbytes(self) -> int:
        return DTYPE_BYTES[self.dtype] * math.prod(self.shape)


@dataclass(frozen=True)
class Target:
    """Where the output tensor goes: its shard, byte range, and the journal to record it in."""

    path: str
    begin: int
    nbytes: int
    journal: str


@dataclass(frozen=True)
class TensorJob:
    """One output tensor's merge (see the module doc)."""

    name: str
    method: str
    params: tuple[tuple[str, Any], ...]  # resolved; per-model values are tuples aligned with xs
    sources: tuple[Source, ...]  # xs in config order, then the base
    xs: int
    base: bool
    dtype: str  # torch dtype name the inputs are merged in (the compute dtype, or their promotion)
    out_dtype: str
    shape: tuple[int, ...]
    seed: int
    target: Target | None  # None: an intermediate tensor, computed for its consumers, not written
    vocab: VocabAlign | None = None  # re-index rows to the output vocabulary first
    device: str = "cpu"
    chunk: int = 500_000  # elements per chunk
    resident: bool = False  # read every input once and keep it for all passes
    blocks: tuple[tuple[int, int], ...] = ()  # row blocks run as separate tasks (empty: one task)
    stage: str = ""  # multi-stage merges: the stage this tensor belongs to ("": the output)

    @property
    def label(self) -> str:
        """The tensor as messages and graph keys name it: `stage:tensor` inside a chain."""
        return f"{self.stage}:{self.name}" if self.stage else self.name

    @cached_property
    def layout(self) -> Layout:
        return Layout(self.shape)

    @property
    def keys(self) -> tuple[int, ...]:
        return stream_keys(self.seed, self.name, self.xs) if REGISTRY[self.method].random else ()

    def meta(self) -> Meta:
        method = REGISTRY[self.method]
        params = {**method.preset, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in self.params}}
        return Meta(self.shape, torch_dtype(self.dtype), self.xs, self.base, params)

    def program(self) -> Program:
        return REGISTRY[self.method].program(self.meta())

    @property
    def computed(self) -> bool:
        """Whether some input is another stage's output, computed in the graph."""
        return any(s.producer is not None for s in self.sources)


@dataclass(frozen=True)
class Produced:
    """An intermediate tensor's statistics (its reduction passes' results) and, per source,
    those of the intermediate tensors it reads itself: what reading its rows needs."""

    stats: dict
    inputs: tuple[Produced | None, ...]


def work_dtype(t: TensorPlan) -> str:
    """The dtype `t` is merged in: the compute dtype, else the inputs' promoted dtype."""
    if t.compute_dtype:
        return t.compute_dtype
    import torch

    dt = None
    for i in t.all_inputs():
        d = getattr(torch, i.stage.tensor.out_dtype if i.stage is not None else CODE_TO_TORCH[i.tensor.dtype])
        dt = d if dt is None else torch.promote_types(dt, d)
    return str(dt).removeprefix("torch.")


def source(plan: MergePlan, inp, out_dir: Path, journal: str, device: str) -> Source:
    info = inp.tensor
    if inp.stage is not None:  # another stage's output: its job, without a target
        producer = job(inp.stage.plan, inp.stage.tensor, out_dir, journal, device, target=False)
        producer = dataclasses.replace(producer, stage=inp.stage.name)
        return Source(inp.stage.name, "", info.name, TORCH_TO_CODE[producer.out_dtype], tuple(producer.shape),
                      crop=inp.crop, producer=producer)
    return Source(plan.models[inp.model].label, info.file, info.name, info.dtype, tuple(info.shape),
                  info.begin, inp.crop, info.lora)


def job(plan: MergePlan, t: TensorPlan, out_dir: Path, journal: str, device: str = "cpu",
        target: bool = True) -> TensorJob:
    """The job of tensor `t` with one task and default chunks (exec/budget.py sizes it)."""
    out = Target(str(out_dir / plan.shards[t.shard].file), t.begin, t.nbytes, journal) if target else None
    sources = tuple(source(plan, i, out_dir, journal, device) for i in t.all_inputs())
    return TensorJob(t.name, t.method, t.params, sources, len(t.inputs), t.base is not None, work_dtype(t),
                     t.out_dtype, tuple(t.shape), plan.seed, out, t.vocab, device)
