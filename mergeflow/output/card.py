"""The model card (README.md) of a merged model."""

from __future__ import annotations

import yaml

from mergeflow import __version__
from mergeflow.plan import MergePlan
from mergeflow.plan.multi import MultiPlan


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


def chain_card(multi: MultiPlan) -> str:
    """The card of a multi-stage merge's output: the models it started from, then every
    stage with its method, its inputs (earlier stages by name) and its config."""
    from mergeflow.sources.stage import StageModel

    stages = multi.stages
    inputs = list(dict.fromkeys(m.label for s in stages for m in s.plan.models if not isinstance(m, StageModel)))
    inputs += [name for name, _ in multi.reused if name not in inputs]
    front = {"base_model": inputs, "library_name": "transformers", "tags": ["merge", "mergeflow"]}
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
