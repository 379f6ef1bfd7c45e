"""A MoEPlan as one Dask graph: the engine's copies plus mergeflow moe's own tasks.

The copies (attention, norms, embeddings, the experts' MLP weights) are passthrough
TensorPlans: `build_graph` makes their tasks, streamed and written at their offsets like any
merge. Added here, with the same keys and return values (the bytes written):
- `("moe-gates", mode)`: the gate vectors of the prompted modes (one task: the base model is
  loaded once); each `("write-gate", rank, router)` takes its rows from it. `random` routers
  are drawn by their own write tasks.
- `("write-noise", rank, part)`: an expert's weight plus seeded gaussian noise.
- `("write-zeros", rank, part)`: zeros (Qwen2-MoE's attention biases of a Llama base).
Each shard's `("finalize", k)` then waits for the engine's writes and these.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from dask.task_spec import Task, TaskRef

from mergeflow.errors import MergeflowError
from mergeflow.exec import gates
from mergeflow.exec.budget import Budget
from mergeflow.exec.graph import build_graph
from mergeflow.exec.journal import journal_path, record_done
from mergeflow.exec.write import sync_file, write_at
from mergeflow.plan import MergePlan
from mergeflow.plan.moe import GatePlan, MoEPlan, Write
from mergeflow.spec.moe import RANDOM_MODES


def engine_plan(plan: MoEPlan) -> MergePlan:
    """The copies as a MergePlan for build_graph, which reads its tensors, shards and seed."""
    return MergePlan(plan.config, plan.models, 0, plan.copies, plan.shards, {}, plan.seed,
                     fingerprint=plan.fingerprint)


def build_moe_graph(plan: MoEPlan, out_dir: str | Path, *, device: str = "cpu",
                    skip: frozenset[str] | set[str] = frozenset(), budget: Budget | None = None) -> tuple[dict, list, list]:
    """(graph, done keys, finalize keys), as build_graph returns them; parts named in `skip`
    are already written."""
    out_dir = Path(out_dir).resolve()
    dsk, done, _ = build_graph(engine_plan(plan), out_dir, device=device, skip=skip, budget=budget)
    journal = str(journal_path(out_dir))
    todo = [w for w in plan.writes if w.name not in skip]
    vectors = None
    if plan.gates.mode not in RANDOM_MODES and any(w.kind == "gate" for w in todo):
        vectors = ("moe-gates", plan.gates.mode)
        dsk[vectors] = Task(vectors, compute_gates, plan.gates)
    mine: dict[int, list] = {k: [] for k in range(len(plan.shards))}
    for rank, w in zip(range(len(plan.writes) - 1, -1, -1), plan.writes):
        if w.name in skip:
            continue
        key = (f"write-{w.kind}", rank, w.name)
        target = (str(out_dir / plan.shards[w.shard].file), w.begin, w.nbytes, w.name, journal)
        if w.kind == "gate":
            source = TaskRef(vectors) if vectors else None
            dsk[key] = Task(key, write_gate, w, plan.gates.mode, plan.seed, target, source)
        elif w.kind == "noise":
            dsk[key] = Task(key, write_noise, w, plan.seed, target)
        else:
            dsk[key] = Task(key, write_zeros, w, target)
        mine[w.shard].append(key)
    finals = []
    for k, shard in enumerate(plan.shards):
        fkey = ("finalize", k)
        waits = sorted(dsk[fkey].dependencies, key=str) + mine[k]
        dsk[fkey] = Task(fkey, finalize, str(out_dir / shard.file), shard.size, *[TaskRef(d) for d in waits])
        finals.append(fkey)
    return dsk, done + [key for k in mine for key in mine[k]], finals


def compute_gates(plan: GatePlan) -> torch.Tensor:
    """The gate vectors of every layer and gated expert; warns of nearly dependent ones."""
    vectors = gates.gate_vectors(plan)
    msg = gates.degenerate_warning(gates.degenerate_layers(vectors), vectors.shape[0])
    if msg:
        warnings.warn(msg, stacklevel=1)
    # to process workers the vectors travel through distributed's torch serializer, which
    # cannot send bfloat16 (the hidden states'); float32 holds them exactly
    return vectors.float()


def write_gate(w: Write, mode: str, seed: int, target: tuple, vectors: torch.Tensor | None) -> int:
    """One router: its rows of the layer's gate vectors, or (random modes) its own draw."""
    if vectors is None:
        weights = gates.random_gate(mode, seed, w.name, w.shape)
    else:
        weights = vectors[w.layer, w.rows[0]:w.rows[1], :]
    return _write(target, weights.to(getattr(torch, w.out_dtype)))


def write_noise(w: Write, seed: int, target: tuple) -> int:
    """An expert's weight plus noise_scale x N(0, 1) (drawn in the weight's dtype by the part's
    own generator), then times residual_scale, then cast; mergekit's order and dtypes."""
    from mergeflow.exec.read import Lora, load_tensor

    x = load_tensor(w.input.tensor.file, w.input.tensor.name)
    if w.input.tensor.lora is not None:
        x = Lora(w.input.tensor.lora, tuple(x.shape)).add(x, slice(None))
    noise = torch.randn(x.shape, generator=gates.seeded(seed, w.name), dtype=x.dtype)
    x = x + noise * w.noise
    if w.scale is not None:
        x = x * w.scale
    return _write(target, x.to(getattr(torch, w.out_dtype)))


def write_zeros(w: Write, target: tuple) -> int:
    return _write(target, torch.zeros(w.shape, dtype=getattr(torch, w.out_dtype)))


def _write(target: tuple, tensor: torch.Tensor) -> int:
    """Put a part's bytes at its planned offset, then record it in the journal."""
    path, begin, nbytes, name, journal = target
    data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    if data.nbytes != nbytes:
        raise MergeflowError(f"write of {name}: {data.nbytes} bytes, but the plan expects {nbytes}")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise MergeflowError(f"{name}: NaN or Inf values; check the inputs and noise_scale")
    try:
        write_at(path, begin, data)
        record_done(journal, name)
    except OSError as e:
        raise MergeflowError(f"write of {name} to {path} failed: {e.strerror or e}") from e
    return nbytes


def finalize(path: str, size: int, *written: int) -> int:
    """Sync a shard whose parts are all written, and check its size."""
    try:
        actual = sync_file(path)
    except OSError as e:
        raise MergeflowError(f"{path}: cannot sync the finished shard: {e.strerror or e}") from e
    if actual != size:
        raise MergeflowError(f"{path}: {actual} bytes after writing, expected {size}")
    return sum(written)
