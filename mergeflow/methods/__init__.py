"""The merge-method registry: one explicit dict from `merge_method:` name to Method.

Each module in this package defines one method (or, for the task-arithmetic family, one
kernel and its presets) as pure functions; nothing registers itself on import.
"""

from __future__ import annotations

from mergeflow.methods import (
    arcee_fusion,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    sce,
    slerp,
    task_arithmetic,
)
from mergeflow.methods.base import Method, Param

REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        linear.METHOD,
        slerp.METHOD,
        nuslerp.METHOD,
        multislerp.METHOD,
        karcher.METHOD,
        *task_arithmetic.METHODS,
        sce.METHOD,
        *ram.METHODS,
        model_stock.METHOD,
        nearswap.METHOD,
        arcee_fusion.METHOD,
        passthrough.METHOD,
    )
}


def get_method(name: str) -> Method:
    return REGISTRY[name]


__all__ = ["REGISTRY", "Method", "Param", "get_method"]
