"""LoRA adapters (`model+adapter` in a config): which weights they change, and the delta.

A PEFT adapter directory holds adapter_config.json (r, lora_alpha, use_rslora,
fan_in_fan_out) and adapter_model.safetensors with `base_model.model.<module>.lora_A.weight`
and `...lora_B.weight` (embeddings: `lora_embedding_A` / `lora_embedding_B`). The merged
weight is W + scale * (B @ A), computed in float32 and rounded once when the tensor loads,
so an adapter costs no extra pass over the disk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from mergeflow.errors import MergeflowError
from mergeflow.sources.tensors import LoraDelta

PREFIX = "base_model.model."


def attach_lora(tensors: dict, adapter_dir: Path, label: str, read_index: Callable[[Path, str], dict]) -> dict:
    """Return `tensors` (name -> TensorInfo) with each adapted weight's LoraDelta attached;
    `read_index(directory, label)` reads the adapter's tensor headers (sources/models.py)."""
    from mergeflow.sources.files import load_json, stat_path

    config = adapter_dir / "adapter_config.json"
    if not adapter_dir.is_dir() or stat_path(config, "adapter config") is None:
        raise MergeflowError(f"adapter {label}: {adapter_dir} has no adapter_config.json; is this a PEFT "
                             "LoRA adapter directory?")
    cfg = load_json(config, "adapter config")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if not _positive(r) or not _positive(alpha):
        raise MergeflowError(f"adapter {label}: {config} needs a positive rank `r` and `lora_alpha` "
                             f"(it has r={r!r}, lora_alpha={alpha!r})")
    scale = alpha / (r ** 0.5 if cfg.get("use_rslora") else r)
    adapter = read_index(adapter_dir, label)
    out = dict(tensors)
    used = 0
    for name in tensors:
        module = PREFIX + name.removesuffix(".weight")
        for a, b, emb in ((".lora_A.weight", ".lora_B.weight", False),
                          (".lora_embedding_A", ".lora_embedding_B", True)):
            if module + a in adapter and module + b in adapter:
                _check_fits(label, tensors[name], adapter[module + a], adapter[module + b],
                            emb or bool(cfg.get("fan_in_fan_out")))
                info = adapter[module + a]
                delta = LoraDelta(info.file, module + a, module + b, scale, emb,
                                  bool(cfg.get("fan_in_fan_out")))
                out[name] = replace(tensors[name], lora=delta)
                used += 1
    if not used:
        raise MergeflowError(f"adapter {label}: none of its tensors matches a weight of the model; "
                             f"expected names like {PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight")
    return out


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _check_fits(label: str, weight, a, b, transposed: bool) -> None:
    """B @ A (transposed for embeddings / fan_in_fan_out) has the weight's shape: from headers."""
    ok = len(a.shape) == 2 and len(b.shape) == 2 and b.shape[1] == a.shape[0]
    delta = (b.shape[0], a.shape[1]) if ok else None
    if delta is not None and transposed:
        delta = delta[::-1]
    if delta != tuple(weight.shape):
        raise MergeflowError(f"adapter {label}: {a.name} {list(a.shape)} and {b.name} {list(b.shape)} "
                             f"do not make a delta of {weight.name}'s shape {list(weight.shape)}; "
                             "is this adapter for another model?")

