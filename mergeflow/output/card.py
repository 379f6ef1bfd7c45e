"""The model card (README.md) of a merged model."""

from __future__ import annotations

import yaml

from mergeflow import __version__
from mergeflow.plan import MergePlan


def model_card(plan: MergePlan) -> str:
    cfg = plan.config
    base = str(cfg.base_model) if cfg.base_model else None
    inputs = [m.label for m in plan.models]
    front = {"base_model": ([base] if base else inputs), "library_name": "transformers",
             "tags": ["merge", "mergeflow"]}
    models = "\n".join(f"- {'`' + m + '`'}{' (base)' if m == base else ''}" for m in inputs)
    return (f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n"
            f"# Merged model\n\nThis model was merged with [mergeflow](https://pypi.org/project/mergeflow/) "
            f"{__version__} using the **{cfg.merge_method}** method.\n\n## Models merged\n\n{models}\n\n"
            f"## Configuration\n\n```yaml\n{cfg.text.strip()}\n```\n")
