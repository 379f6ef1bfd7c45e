"""mergeflow: merge pretrained language models through a Dask graph.

Pipeline: load_config (spec/) -> plan_merge (plan/) -> build_graph (exec/) -> run_merge
(output/). Merge kernels live in methods/, input headers in sources/.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "MergeflowError", "RunOptions", "build_graph", "load_config", "merge_state_dicts",
           "merge_tensors", "plan_merge", "run_merge"]

_LAZY = {  # `import mergeflow` must not import torch or dask
    "load_config": "mergeflow.spec.config",
    "plan_merge": "mergeflow.plan",
    "build_graph": "mergeflow.exec.graph",
    "run_merge": "mergeflow.output.merge",
    "RunOptions": "mergeflow.exec.options",
    "MergeflowError": "mergeflow.errors",
    "merge_tensors": "mergeflow.methods.api",
    "merge_state_dicts": "mergeflow.methods.api",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
