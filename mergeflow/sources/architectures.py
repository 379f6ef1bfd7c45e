"""What cannot be inferred from tensor names: embeddings, tied heads, the layer-count key.

Layers are inferred for any decoder model from names `<prefix>.<i>.<rest>`; the table of
known families says which non-layer tensors are vocabulary-indexed (the input embedding,
the LM head and its bias: their dim 0 is the token id), which head is tied to the input
embedding when absent, and which config.json key holds the layer count.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

_LAYER = re.compile(r"^(.*?\.|)(\d+)\.(.+)$")


@dataclass(frozen=True)
class Family:
    """Facts about one architecture family (matched on config.json `model_type`)."""

    embed: tuple[str, ...] = ("model.embed_tokens.weight",)  # vocab-indexed input tensors
    lm_head: str | None = "lm_head.weight"  # vocab-indexed output head (tied when absent)
    pre: tuple[str, ...] = ()  # other tensors that come before the layers (position embeddings)
    layer_key: str = "num_hidden_layers"

    @property
    def vocab_tensors(self) -> tuple[str, ...]:
        return self.embed + ((self.lm_head,) if self.lm_head else ())


_LLAMA_LIKE = Family()
FAMILIES: dict[str, Family] = {
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe",
                                 "qwen3_moe", "gemma", "gemma2", "gemma3_text", "phi3", "stablelm",
                                 "olmo", "olmo2", "granite", "cohere", "starcoder2", "internlm2")},
    "gpt_neox": Family(embed=("gpt_neox.embed_in.weight",), lm_head="embed_out.weight"),
    "gpt2": Family(embed=("transformer.wte.weight", "wte.weight"), lm_head="lm_head.weight",
                   pre=("transformer.wpe.weight", "wpe.weight"), layer_key="n_layer"),
    "phi": Family(embed=("model.embed_tokens.weight",), lm_head="lm_head.weight"),
}


def family(config: dict) -> Family:
    return FAMILIES.get(str(config.get("model_type", "")), _LLAMA_LIKE)


def architecture(config: dict) -> str:
    archs = config.get("architectures") or [config.get("model_type", "unknown")]
    return str(archs[0])


LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def layer_count(config: dict) -> int | None:
    """The layer count config.json states (a multimodal model's in its `text_config`)."""
    for cfg in (config, config.get("text_config")):
        if not isinstance(cfg, dict):
            continue
        for key in (family(cfg).layer_key, *LAYER_KEYS):
            value = cfg.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
    return None


@dataclass(frozen=True)
class Layout:
    """A model's tensors split into before-layers, per-layer (by suffix), after-layers."""

    prefix: str  # e.g. "model.layers."
    layers: int
    layer_suffixes: tuple[str, ...]  # names inside layer i are f"{prefix}{i}.{suffix}"
    pre: tuple[str, ...]
    post: tuple[str, ...]

    def layer_name(self, i: int, suffix: str) -> str:
        return f"{self.prefix}{i}.{suffix}"


def infer_layout(names: list[str], fam: Family) -> Layout:
    """Find the layer prefix (the one with most numbered children) and split the names."""
    counts: Counter[str] = Counter()
    indices: dict[str, set[int]] = {}
    for name in names:
        m = _LAYER.match(name)
        if m:
            counts[m.group(1)] += 1
            indices.setdefault(m.group(1), set()).add(int(m.group(2)))
    if not counts:
        return Layout("", 0, (), tuple(n for n in names if _is_pre(n, fam)),
                      tuple(n for n in names if not _is_pre(n, fam)))
    prefix = max(indices, key=lambda p: (len(indices[p]), counts[p]))
    layers = max(indices[prefix]) + 1
    suffixes: dict[str, None] = {}
    pre, post = [], []
    for name in names:
        m = _LAYER.match(name)
        if m and m.group(1) == prefix:
            suffixes.setdefault(m.group(3))
        elif _is_pre(name, fam):
            pre.append(name)
        else:
            post.append(name)
    return Layout(prefix, layers, tuple(suffixes), tuple(pre), tuple(post))


def _is_pre(name: str, fam: Family) -> bool:
    return name in fam.embed or name in fam.pre or "embed_tokens" in name or name.endswith(
        ("wte.weight", "wpe.weight", "embed_in.weight"))


VOCAB_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "lm_head.bias")


def is_vocab_tensor(name: str, fam: Family) -> bool:
    """Is dim 0 of this tensor indexed by token id (embeddings, LM head, per-token biases)?"""
    return name in fam.vocab_tensors or name.endswith(VOCAB_SUFFIXES)



def natural_key(name: str) -> tuple:
    """Sort key that orders `layers.2` before `layers.10`."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))
