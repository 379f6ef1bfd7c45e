"""The model card (README.md) of a merged model, in the form the Hugging Face Hub accepts.

Front matter: `base_model` lists the Hub id of every input (models, LoRA adapters; local
directories have no Hub id and are left out), `base_model_relation: merge` (with a base
model list only: the Hub relates a merge to its inputs), `tags: [merge, mergeflow]`,
`library_name: transformers`, and `license` (with `license_name` / `license_link` for
`other`) when every input's own card names the same one. The body names the method with a
link to its paper, lists the models (Hub ids linked) and quotes the config.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mergeflow import __version__
from mergeflow.plan import MergePlan
from mergeflow.plan.multi import MultiPlan
from mergeflow.spec.config import ModelRef

HUB = "https://huggingface.co"
# merge_method -> (the name papers use, where the method is described)
METHODS: dict[str, tuple[str, str]] = {
    "linear": ("Linear (model soups)", "https://arxiv.org/abs/2203.05482"),
    "slerp": ("SLERP", "https://en.wikipedia.org/wiki/Slerp"),
    "nuslerp": ("NuSLERP", "https://en.wikipedia.org/wiki/Slerp"),
    "multislerp": ("Multi-SLERP", "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"),
    "karcher": ("Karcher mean", "https://arxiv.org/abs/2603.04972"),
    "task_arithmetic": ("Task Arithmetic", "https://arxiv.org/abs/2212.04089"),
    "ties": ("TIES", "https://arxiv.org/abs/2306.01708"),
    "dare_ties": ("DARE TIES", "https://arxiv.org/abs/2311.03099"),
    "dare_linear": ("DARE linear", "https://arxiv.org/abs/2311.03099"),
    "breadcrumbs": ("Model Breadcrumbs", "https://arxiv.org/abs/2312.06795"),
    "breadcrumbs_ties": ("Model Breadcrumbs with TIES", "https://arxiv.org/abs/2312.06795"),
    "della": ("DELLA", "https://arxiv.org/abs/2406.11617"),
    "della_linear": ("DELLA linear", "https://arxiv.org/abs/2406.11617"),
    "sce": ("SCE", "https://arxiv.org/abs/2408.07990"),
    "ram": ("RAM", "https://arxiv.org/abs/2601.13572"),
    "ramplus_tl": ("RAM+", "https://arxiv.org/abs/2601.13572"),
    "model_stock": ("Model Stock", "https://arxiv.org/abs/2403.19522"),
    "nearswap": ("NearSwap", f"{HUB}/alchemonaut/QuartetAnemoi-70B-t0.0001"),
    "arcee_fusion": ("Arcee Fusion", "https://arcee.ai"),
    "passthrough": ("Passthrough", ""),
}


def hub_id(path: str) -> str | None:
    """The Hub id a model reference names, or None for a local directory (what exists
    here is local, as sources.models resolves references)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(path).expanduser().exists():
        return None
    try:
        validate_repo_id(path)
    except HFValidationError:
        return None
    return path


def _refs(plan: MergePlan) -> list[str]:
    """Every input's Hub id (model, then its adapter), in config order, each once."""
    ids: list[str] = []
    for m in plan.models:
        for path in (m.ref.path, m.ref.lora):
            found = hub_id(path) if path else None
            if found and found not in ids:
                ids.append(found)
    return ids


def _license(plan: MergePlan) -> dict[str, str]:
    """The license fields every input's card agrees on (none if one has no card or differs)."""
    from huggingface_hub import ModelCard

    seen = []
    for m in plan.models:
        card = Path(m.path) / "README.md"
        try:
            data = ModelCard.load(card, ignore_metadata_errors=True).data.to_dict() if card.is_file() else {}
        except Exception:  # a card the Hub library cannot read says nothing about its license
            data = {}
        seen.append({k: data[k] for k in ("license", "license_name", "license_link")
                     if isinstance(data.get(k), str)})
    first = seen[0] if seen else {}
    return first if first.get("license") and all(s == first for s in seen) else {}


def _label(ref: ModelRef) -> str:
    def one(path: str) -> str:
        found = hub_id(path)
        return f"[{found}]({HUB}/{found})" if found else f"`{path}`"

    text = one(ref.path) + (f" (revision `{ref.revision}`)" if ref.revision else "")
    return text + (f" with the LoRA adapter {one(ref.lora)}" if ref.lora else "")


def front_matter(plan: MergePlan) -> dict:
    front: dict = {}
    bases = _refs(plan)
    if bases:
        front["base_model"] = bases
        front["base_model_relation"] = "merge"
    front.update(_license(plan))
    front["library_name"] = "transformers"
    front["tags"] = ["merge", "mergeflow"]
    return front


def model_card(plan: MergePlan) -> str:
    cfg = plan.config
    name, url = METHODS.get(cfg.merge_method, (cfg.merge_method, ""))
    method = f"[{name}]({url})" if url else name
    base = cfg.base_model
    base_text = f", with {_label(base)} as the base" if base else ""
    models = "\n".join(f"- {_label(m.ref)}{' (base)' if base and str(m.ref) == str(base) else ''}"
                       for m in plan.models)
    return (f"---\n{yaml.safe_dump(front_matter(plan), sort_keys=False)}---\n"
            f"# Merged model\n\n"
            f"This model is a merge of pretrained language models made with "
            f"[mergeflow](https://pypi.org/project/mergeflow/) {__version__}, using the {method} "
            f"merge method (`merge_method: {cfg.merge_method}`){base_text}.\n\n"
            f"## Models merged\n\n{models}\n\n"
            f"## Configuration\n\nThe merge config (also in `mergekit_config.yml`):\n\n"
            f"```yaml\n{(cfg.text or '').strip()}\n```\n")


def chain_card(multi: MultiPlan) -> str:
    """The card of a multi-stage merge's output: the models it started from, then every
    stage with its method, its inputs (earlier stages by name) and its config."""
    from mergeflow.sources.stage import StageModel

    stages = multi.stages
    inputs = list(dict.fromkeys(m.label for s in stages for m in s.plan.models if not isinstance(m, StageModel)))
    inputs += [name for name, _ in multi.reused if name not in inputs]
    hub = list(dict.fromkeys(i for i in (hub_id(name) for name in inputs) if i))
    front = {"base_model": hub, **({"base_model_relation": "merge"} if hub else {}),
             "library_name": "transformers", "tags": ["merge", "mergeflow"]}
    parts = []
    for s in stages:
        title = f"Stage `{s.name}`" if s.name else "The output"
        role = "the output" if s is multi.output else (f"written to `{s.out_dir}`" if s.out_dir else
                                                       "computed in the same graph, never written")
        models = ", ".join(f"`{m.label}`" for m in s.plan.models)
        parts.append(f"### {title}: {s.plan.config.merge_method} ({role})\n\nInputs: {models}\n\n"
                     f"```yaml\n{s.plan.config.text.strip()}\n```\n")
    reused = "".join(f"\nStage `{n}` was read from `{d}` as it was (--lazy).\n" for n, d in multi.reused)
    return (f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n"
            f"# Merged model\n\nThis model was merged with [mergeflow](https://pypi.org/project/mergeflow/) "
            f"{__version__} in {len(stages)} stage(s), as one graph: stages read earlier stages' results "
            f"by name.\n\n## Models merged\n\n" + "\n".join(f"- `{m}`" for m in inputs) + "\n" + reused
            + "\n## Stages\n\n" + "\n".join(parts))
