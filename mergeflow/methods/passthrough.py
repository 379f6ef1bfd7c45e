"""passthrough: copy the one input tensor, optionally multiplied by `scale`."""

from __future__ import annotations

import torch

from mergeflow.methods.base import Method, Param


def passthrough(xs: list[torch.Tensor], base: torch.Tensor | None, *, scale: list[float | None]) -> torch.Tensor:
    """x, or x * scale with `scale` a Python float: torch computes a low-precision tensor times
    a scalar in float32 and rounds once, so 0.9 is not first rounded to the tensor's dtype
    (as mergekit 0.1.5)."""
    x = xs[0]
    if scale[0] is None:
        return x
    return x * float(scale[0])


METHOD = Method(
    name="passthrough",
    kernel=passthrough,
    params=(Param("scale", float, default=None, per_model=True, doc="multiply the tensor by this"),),
    base="input",
    min_inputs=1,
    max_inputs=1,
    row_separable=True,
    doc="Copy tensors from exactly one model per tensor (frankenmerges).",
)
