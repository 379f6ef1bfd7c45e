"""A model's modules as transformers builds them: names, kinds and which tensor holds each weight.

Header names alone cannot tell a Linear from a norm, or a GPT-2 Conv1D (stored transposed)
from a Linear, and they do not say which module a PEFT adapter can target. So the model class
is built from config.json on the meta device (no memory, no weights read), as mergekit and
PEFT see it, and each module that has a `weight` is listed in the model's own order with the
checkpoint name its weight is stored under (a tied LM head is stored as the input embedding).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mergeflow.errors import MergeflowError


@dataclass(frozen=True)
class Module:
    """One module with a weight: its name, what it is, and the parameter names behind it."""

    name: str  # model.layers.0.self_attn.q_proj
    kind: str  # "linear", "embedding" (nn.Embedding) or "other" (norms, Conv1D, convolutions)
    type_name: str  # the module's class, for messages: LlamaRMSNorm
    weight: tuple[str, ...]  # names the weight may be stored under: its own, then the tied ones
    bias: str | None = None
    vocab: bool = False  # the model's input or output embedding


def model_modules(path: str | Path, label: str, *, trust_remote_code: bool = False) -> list[Module]:
    """Every module of the model in `path` that has a weight, in the model's module order."""
    model = _meta_model(Path(path), label, trust_remote_code)
    vocab = {id(m) for m in (model.get_input_embeddings(), _output_embeddings(model)) if m is not None}
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    out = []
    for name, module in model.named_modules():
        weight = getattr(module, "_parameters", {}).get("weight")
        if weight is None:
            continue
        own = f"{name}.weight"
        names = (own, *[n for n in aliases.get(id(weight), []) if n != own])
        bias = f"{name}.bias" if getattr(module, "_parameters", {}).get("bias") is not None else None
        out.append(Module(name, _kind(module), type(module).__name__, names, bias, id(module) in vocab))
    return out


def _kind(module) -> str:
    from torch import nn

    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return "other"


def _output_embeddings(model):
    try:
        return model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def _meta_model(path: Path, label: str, trust_remote_code: bool):
    import torch
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        arch = (getattr(config, "architectures", None) or ["?"])[0]
        with torch.device("meta"):
            return _auto_class(arch).from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as e:
        hint = "" if trust_remote_code else "; if the model ships its own code, pass --trust-remote-code"
        raise MergeflowError(f"model {label}: transformers cannot build its model class from "
                             f"{path / 'config.json'} ({str(e).splitlines()[0]}){hint}") from None
    except OSError as e:
        raise MergeflowError(f"model {label}: cannot read {path / 'config.json'}: {e}") from None


def _auto_class(arch: str):
    """The transformers auto class for an architecture name, as mergekit picks it."""
    import transformers

    for suffix, cls in (("ForMaskedLM", "AutoModelForMaskedLM"),
                        ("ForSequenceClassification", "AutoModelForSequenceClassification"),
                        ("ForTokenClassification", "AutoModelForTokenClassification")):
        if arch.endswith(suffix):
            return getattr(transformers, cls)
    return transformers.AutoModelForCausalLM
