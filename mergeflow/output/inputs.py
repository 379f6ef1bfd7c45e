"""Every directory a merge reads (or file, for a model given as one file), for the output checks: the models (and the directories
their weight files really live in), their LoRA adapters, the tokenizer source and the
`tokens:` source models."""

from __future__ import annotations

from pathlib import Path

from mergeflow.errors import MergeflowError
from mergeflow.plan import MergePlan
from mergeflow.plan.tokenizer import tokenizer_setting
from mergeflow.sources.hub import resolve_model_path
from mergeflow.spec.config import MergeConfig, ModelRef, ModelTokenEmbedding


def input_dirs(plan: MergePlan) -> list[tuple[str, Path]]:
    """(what it is, directory) for every input directory of `plan`, each once."""
    found: dict[Path, str] = {}
    for m in plan.models:
        found.setdefault(Path(m.path), f"the input model {m.label}")
        for f in {t.file for t in m.tensors.values()}:  # a Hub cache's snapshot links into its blobs
            real = Path(f).resolve()  # a model given as one file: that file, not its directory
            found.setdefault(real if Path(m.path).is_file() else real.parent, f"the input model {m.label}")
        for f in {t.lora.file for t in m.tensors.values() if t.lora}:
            found.setdefault(Path(f).parent, f"the LoRA adapter {m.ref.lora} of {m.ref.path}")
            found.setdefault(Path(f).resolve().parent, f"the LoRA adapter {m.ref.lora} of {m.ref.path}")
    for what, ref in _named_sources(plan):
        try:
            path = resolve_model_path(ref, allow_download=False)
            found.setdefault(path if path.is_dir() else path.parent, f"{what} {ref}")
        except MergeflowError:  # planning read it; gone since: nothing there to protect
            pass
    return [(what, path) for path, what in found.items()]


def _named_sources(plan: MergePlan) -> list[tuple[str, ModelRef]]:
    """The models a config names for its tokenizer: the source and `tokens:` sources."""
    config = getattr(plan, "config", None)  # plans of other kinds (moe, extract-lora) name none
    if not isinstance(config, MergeConfig):
        return []
    out = []
    setting = tokenizer_setting(config)
    if isinstance(setting, ModelRef):
        out.append(("the tokenizer source", setting))
    tokens = (config.tokenizer.tokens or {}) if config.tokenizer is not None else {}
    for entry in tokens.values():
        source = entry.source.model if isinstance(entry.source, ModelTokenEmbedding) else entry.source
        if isinstance(source, ModelRef):
            out.append(("the `tokens:` source model", source))
    return out
