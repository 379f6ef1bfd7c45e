"""passthrough: copy the one input tensor, optionally multiplied by `scale`."""

from __future__ import annotations

import torch

from mergeflow.methods.base import Method, Param


def passthrough(xs: list[torch.Tensor], base: torch.Tensor | None, *, scale: list[float | None]) -> torch.Tensor:
    x = xs[0]
    if scale[0] is None:
        return x
    return x * torch.tensor(scale[0], dtype=x.dtype, device=x.device)


METHOD = Method(
    name="passthrough",
    kernel=passthrough,
    params=(Param("scale", float, default=None, per_model=True, doc="multiply the tensor by this"),),
    base="input",
    min_inputs=1,
    max_inputs=1,
    doc="Copy tensors from exactly one model per tensor (frankenmerges).",
)
