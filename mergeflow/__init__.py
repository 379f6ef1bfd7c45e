"""mergeflow: merge pretrained language models through a Dask graph.

Pipeline: load_config (config.py) -> plan_merge (plan.py) -> build_graph (graph.py)
-> run_merge (run.py). Merge kernels live in methods/, model I/O in io/.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_config", "plan_merge", "build_graph", "run_merge"]


def __getattr__(name: str):  # lazy: `import mergeflow` must not import torch or dask
    if name == "load_config":
        from mergeflow.config import load_config

        return load_config
    if name == "plan_merge":
        from mergeflow.plan import plan_merge

        return plan_merge
    if name == "build_graph":
        from mergeflow.graph import build_graph

        return build_graph
    if name == "run_merge":
        from mergeflow.run import run_merge

        return run_merge
    raise AttributeError(name)
