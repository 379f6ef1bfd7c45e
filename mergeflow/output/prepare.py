"""Check and prepare the output directory before the merge.

Refuse an output that is an input, or non-empty without --force/--resume, and remove any
config.json and index so a half-written output never looks complete.
"""

from __future__ import annotations

from pathlib import Path

from mergeflow.errors import MergeflowError
from mergeflow.output.metadata import COMPLETE_MARKERS
from mergeflow.plan import MergePlan


def prepare_output(plan: MergePlan, out_dir: Path, *, force: bool, resume: bool) -> None:
    out_dir = out_dir.resolve()
    for m in plan.models:
        model_dir = Path(m.path).resolve()
        if out_dir == model_dir or model_dir in out_dir.parents or out_dir in model_dir.parents:
            raise MergeflowError(f"output directory {out_dir} overlaps the input model {m.label} "
                                 f"({model_dir}); choose a separate output directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise MergeflowError(f"output {out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not (force or resume):
        raise MergeflowError(f"output directory {out_dir} is not empty; pass --force to overwrite "
                             "it or --resume to continue an interrupted merge")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MergeflowError(f"cannot create the output directory {out_dir}: {e.strerror or e}; "
                             "choose another output path") from None
    for name in COMPLETE_MARKERS:  # from now until the end, the output does not look complete
        (out_dir / name).unlink(missing_ok=True)
    planned = {s.file for s in plan.shards}
    for stale in out_dir.glob("model*.safetensors"):
        if stale.name not in planned:
            stale.unlink()
