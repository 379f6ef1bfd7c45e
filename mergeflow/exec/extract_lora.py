"""The graph of a LoRA extraction: one task per LoRA module, one per tensor copied whole.

- `("extract-lora", rank, module)`: read the module's fine-tune and base weights, take the SVD of
  their difference in float32 on the device, write lora_A and lora_B at their planned offsets
  of adapter_model.safetensors, record the rank and reconstruction error, journal the module;
- `("copy", rank, tensor)`: a modules_to_save weight or a bias, the fine-tune's bytes written
  at their offset;
- `("finalize", 0)`: sync the file once everything is in it.
With --sv-epsilon the ranks, and so the file's layout, depend on the singular values: a first
graph decomposes each module once into a scratch safetensors file of its own
(OUT/.mergeflow/factors/), the file is laid out from their headers, and the second graph
copies the factors into place (a copy of r x (rows + cols) values, against the SVD of
rows x cols: counting the ranks first with svdvals would cost 53-77% of a second SVD,
benchmarks/bench_lowrank.py).

The tasks' own results are the bytes they wrote (the progress bar); ranks and errors go to
per-process record files in OUT/.mergeflow (like the journal's parts), so a resumed run still
knows those of the modules an interrupted one finished.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from dask.task_spec import Task, TaskRef
from safetensors.torch import save_file

from mergeflow.errors import MergeflowError
from mergeflow.exec.journal import STATE_DIR, journal_path, record_done
from mergeflow.exec.lowrank import decompose, rank_for, relative_error
from mergeflow.exec.read import Lora, load_tensor
from mergeflow.exec.write import sync_file, write_at
from mergeflow.plan.extract_lora import EMBEDDING, AdapterTensor, ExtractPlan, ModulePlan
from mergeflow.sources.models import TensorInfo

REPORT = "report"
FACTORS = "factors"  # OUT/.mergeflow/factors/<module index>.safetensors (--sv-epsilon)


@dataclass(frozen=True)
class LoraJob:
    """One LoRA module's decomposition: inputs, rank, where its factors go."""

    module: str
    finetune: TensorInfo
    base: TensorInfo
    transpose: bool  # an embedding: decompose the transposed delta
    rank: int  # the rank to write (with sv_epsilon > 0: the most to keep)
    sv_epsilon: float
    distribute_scale: bool
    out_dtype: str
    device: str
    path: str = ""  # adapter_model.safetensors
    a: tuple[str, int, int] = ("", 0, 0)  # lora_A: (tensor name, begin, bytes)
    b: tuple[str, int, int] = ("", 0, 0)


def _load(info: TensorInfo) -> torch.Tensor:
    t = load_tensor(info.file, info.name)
    return Lora(info.lora, tuple(info.shape)).add(t, slice(None)) if info.lora is not None else t


def _delta(job: LoraJob) -> torch.Tensor:
    """fine-tune - base in float32 on the job's device (transposed for an embedding)."""
    device = torch.device(job.device)
    delta = _load(job.finetune).to(device, torch.float32) - _load(job.base).to(device, torch.float32)
    if not bool(torch.isfinite(delta.sum())):
        raise MergeflowError(f"{job.module}: the difference of {job.finetune.name} between the fine-tune "
                             f"and the base has NaN or Inf values ({job.finetune.file}, "
                             f"{job.base.file}); check the inputs")
    return delta.T if job.transpose else delta


def _factors(job: LoraJob, records: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B of one module in the output dtype, on the CPU; the rank (job.rank, or with
    sv_epsilon the values above it, at most job.rank) and the error recorded."""
    delta = _delta(job)
    a, b, s = decompose(delta, job.rank, job.distribute_scale)
    rank = rank_for(s, job.rank, job.sv_epsilon)
    dtype = getattr(torch, job.out_dtype)
    a, b = a[:rank].to(dtype), b[:, :rank].to(dtype)
    append_record(records, REPORT, {"module": job.module, "rank": rank,
                                    "error": relative_error(delta, a, b)})
    return a.cpu(), b.cpu()


def extract(job: LoraJob, journal: str, records: str) -> int:
    """Decompose one module's change, write its factors at their offsets, record the rank
    and the error, and journal both factors."""
    a, b = _factors(job, records)
    for (name, begin, nbytes), t in zip((job.a, job.b), (a, b)):
        _write(job.path, begin, nbytes, name, t)
    for name, _, _ in (job.a, job.b):
        _journal(journal, name, job.path)
    return job.a[2] + job.b[2]


def factorize(job: LoraJob, scratch: str, records: str) -> int:
    """--sv-epsilon: decompose one module's change at the rank its singular values give, into
    a scratch safetensors file of its own (`A`, `B`), which appears whole or not at all; the
    factors are copied into the adapter once every rank, and so its layout, is known."""
    a, b = _factors(job, records)
    tmp = f"{scratch}.{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}.tmp"
    try:
        save_file({"A": a.contiguous(), "B": b.contiguous()}, tmp, metadata={"format": "pt"})
        os.replace(tmp, scratch)
    except OSError as e:
        raise MergeflowError(f"{job.module}: cannot write its factors to {scratch}: {e.strerror or e}") from e
    return os.stat(scratch).st_size


def copy(source: TensorInfo, path: str, begin: int, nbytes: int, name: str, journal: str) -> int:
    """Write a fine-tune tensor's bytes (a module saved whole, a bias) at its offset."""
    _write(path, begin, nbytes, name, _load(source))
    _journal(journal, name, path)
    return nbytes


def _write(path: str, begin: int, nbytes: int, name: str, tensor: torch.Tensor) -> None:
    data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    if data.nbytes != nbytes:
        raise MergeflowError(f"write of {name}: {data.nbytes} bytes, but the plan expects {nbytes}")
    try:
        write_at(path, begin, data)
    except OSError as e:
        raise MergeflowError(f"write of {name} to {path} failed: {e.strerror or e}") from e


def _journal(journal: str, name: str, path: str) -> None:
    try:
        record_done(journal, name)
    except OSError as e:
        raise MergeflowError(f"write of {name} to {path} failed: {e.strerror or e}") from e


def finalize(path: str, size: int, *written: int) -> int:
    """Sync the adapter file once every tensor is in it, and check its size."""
    try:
        actual = sync_file(path)
    except OSError as e:
        raise MergeflowError(f"{path}: cannot sync the finished adapter: {e.strerror or e}") from e
    if actual != size:
        raise MergeflowError(f"{path}: {actual} bytes after writing, expected {size}")
    return sum(written)


def count(*results: int) -> int:
    return len(results)


# ------------------------------------------------------------------------------------- graphs

def _job(plan: ExtractPlan, m: ModulePlan, device: str, rank: int, path: str = "",
         a: AdapterTensor | None = None, b: AdapterTensor | None = None) -> LoraJob:
    o = plan.options
    where = [(t.name, t.begin, t.nbytes) if t is not None else ("", 0, 0) for t in (a, b)]
    return LoraJob(m.name, m.weight, m.base, m.kind == EMBEDDING, rank, o.sv_epsilon,
                   o.distribute_scale, m.out_dtype, device, path, *where)


def scratch_path(out_dir: Path, plan: ExtractPlan, module: str) -> Path:
    index = [m.name for m in plan.loras].index(module)
    return Path(out_dir).resolve() / STATE_DIR / FACTORS / f"{index:05d}.safetensors"


def factor_graph(plan: ExtractPlan, out_dir: Path, device: str, skip: set[str]) -> tuple[dict, list, list]:
    """--sv-epsilon: decompose every LoRA module not in `skip` into its scratch file."""
    records = str(Path(out_dir).resolve() / STATE_DIR)
    dsk, keys = {}, []
    loras = plan.loras
    for i, m in enumerate(loras):
        if m.name in skip:
            continue
        key = ("extract-lora", len(loras) - 1 - i, m.name)
        dsk[key] = Task(key, factorize, _job(plan, m, device, m.cap), str(scratch_path(out_dir, plan, m.name)),
                        records)
        keys.append(key)
    dsk[("factors", 0)] = Task(("factors", 0), count, *[TaskRef(k) for k in keys])
    return dsk, keys, [("factors", 0)]


def extract_graph(plan: ExtractPlan, out_dir: Path, device: str, skip: set[str]) -> tuple[dict, list, list]:
    """Decompose and copy every tensor of the laid-out plan that `skip` does not name; a
    module's lora_A and lora_B come from one task."""
    out_dir = Path(out_dir).resolve()
    path, journal, records = str(out_dir / plan.shard.file), str(journal_path(out_dir)), str(out_dir / STATE_DIR)
    modules = {m.name: m for m in plan.modules}
    factors: dict[str, dict[str, AdapterTensor]] = {}
    for t in plan.tensors:
        if t.part in ("A", "B"):
            factors.setdefault(t.module, {})[t.part] = t
    dsk, keys = {}, []
    n = len(plan.tensors)
    for i, t in enumerate(plan.tensors):
        rank = n - 1 - i  # dask.order runs the largest key first among ties: file order
        if t.source is None and t.part == "A" and not {t.name, factors[t.module]["B"].name} <= skip:
            m, key = modules[t.module], ("extract-lora", rank, t.module)
            job = _job(plan, m, device, plan.ranks[m.name], path, t, factors[t.module]["B"])
            dsk[key] = Task(key, extract, job, journal, records)
        elif t.source is not None and t.name not in skip:
            key = ("copy", rank, t.name)
            dsk[key] = Task(key, copy, t.source, path, t.begin, t.nbytes, t.name, journal)
        else:
            continue
        keys.append(key)
    final = ("finalize", 0)
    dsk[final] = Task(final, finalize, path, plan.shard.size, *[TaskRef(k) for k in keys])
    return dsk, keys, [final]


# ------------------------------------------------------------------------------------ records

def append_record(state_dir: str, kind: str, record: dict) -> None:
    """One JSON line appended to this process's `kind` file (one small O_APPEND write)."""
    path = Path(state_dir) / f"{kind}-{socket.gethostname()}-{os.getpid()}"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record, sort_keys=True) + "\n").encode())
    finally:
        os.close(fd)


def read_records(out_dir: Path, kind: str) -> dict[str, dict]:
    """Every whole record of `kind`, by module (a later one wins)."""
    out: dict[str, dict] = {}
    for part in sorted((Path(out_dir) / STATE_DIR).glob(f"{kind}-*")):
        for line in part.read_text().split("\n")[:-1]:
            try:
                record = json.loads(line)
            except ValueError:  # torn by a crash; the module is redone
                continue
            out[record["module"]] = record
    return out


def restart_records(out_dir: Path, kind: str, keep: set[str]) -> dict[str, dict]:
    """Rewrite `kind`'s records to those of the modules in `keep`, and return them."""
    kept = {m: r for m, r in read_records(out_dir, kind).items() if m in keep}
    state = Path(out_dir) / STATE_DIR
    for part in state.glob(f"{kind}-*"):
        part.unlink(missing_ok=True)
    for record in kept.values():
        append_record(str(state), kind, record)
    return kept
