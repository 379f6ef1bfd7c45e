"""PyTorch `.bin` output (`--no-safe-serialization`, RunOptions.safe_serialization=False).

Named as transformers and mergekit name them: `pytorch_model.bin`, or
`pytorch_model-0000k-of-0000n.bin` with `pytorch_model.bin.index.json`; the same tensors in
the same shards as the safetensors output.

The merge always writes the planned safetensors shards (offsets fixed up front, exec/). Once
every tensor is in place, each shard in turn becomes its `.bin`: the shard is mapped and its
tensors are views of the mapping, so torch.save copies the bytes from the page cache into the
file and no tensor is copied into the process's own memory (reclaimable page cache aside).
The .bin goes to a temporary name, reaches the disk and is renamed; then the shard is deleted,
so the disk holds at most one shard twice. If this is interrupted, the shards already
converted are gone: the journal still lists their tensors, and `--resume` merges them again.
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

from mergeflow import __version__
from mergeflow.dtypes import DTYPE_BYTES, torch_dtype
from mergeflow.plan import MergePlan

BIN_INDEX = "pytorch_model.bin.index.json"


def bin_names(n: int) -> list[str]:
    if n == 1:
        return ["pytorch_model.bin"]
    return [f"pytorch_model-{k + 1:05d}-of-{n:05d}.bin" for k in range(n)]


def write_bin(plan: MergePlan, out_dir: Path) -> None:
    """Every safetensors shard of `plan` in OUT rewritten as its .bin (and the index if there
    are several); .bin files of an earlier output that this one does not have are removed."""
    names = bin_names(len(plan.shards))
    for stale in out_dir.glob("pytorch_model*.bin"):
        if stale.name not in names:
            stale.unlink()
    for shard, name in zip(plan.shards, names):
        shard_to_bin(out_dir / shard.file, out_dir / name, shard.tensors)
    if len(names) > 1:
        weight_map = {t.name: names[t.shard] for t in plan.tensors}
        index = {"metadata": {"total_size": sum(t.nbytes for t in plan.tensors),
                              "mergeflow_version": __version__}, "weight_map": weight_map}
        tmp = out_dir / (BIN_INDEX + ".tmp")
        tmp.write_text(json.dumps(index, indent=2) + "\n")
        os.replace(tmp, out_dir / BIN_INDEX)


def shard_to_bin(src: Path, dst: Path, order: tuple[str, ...]) -> None:
    """The safetensors file `src` as a torch.save'd state dict at `dst`, tensors in `order`;
    `src` is deleted once `dst` is complete on disk."""
    import torch

    tmp = dst.with_name(dst.name + ".tmp")
    with open(src, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
        # a private mapping: writable as torch.frombuffer wants, never written, so never copied
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    tensors = {name: _view(mapped, 8 + length, header[name]) for name in order}
    try:
        with open(tmp, "wb") as out:  # a file object: the archive's records are named archive/...
            torch.save(tensors, out)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise  # the mapping goes with the traceback that still holds its views
    del tensors
    mapped.close()
    os.replace(tmp, dst)
    src.unlink()


def _view(mapped: mmap.mmap, start: int, entry: dict):
    """One tensor of a safetensors file, as a view of its mapping (no copy)."""
    import torch

    dtype = torch_dtype(entry["dtype"])
    begin, end = entry["data_offsets"]
    if end == begin:  # torch.frombuffer refuses empty ranges
        return torch.empty(entry["shape"], dtype=dtype)
    count = (end - begin) // DTYPE_BYTES[entry["dtype"]]
    return torch.frombuffer(mapped, dtype=dtype, count=count, offset=start + begin).reshape(entry["shape"])
