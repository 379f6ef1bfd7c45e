"""passthrough: copy the one input tensor, optionally multiplied by `scale`."""

from __future__ import annotations

import torch

from mergeflow.methods.base import Method, Param
from mergeflow.methods.passes import Chunk, Meta, Program, run_whole


def program(meta: Meta) -> Program:
    """x, or x * scale with `scale` a Python float: torch computes a low-precision tensor times
    a scalar in float32 and rounds once, so 0.9 is not first rounded to the tensor's dtype
    (as mergekit 0.1.5)."""
    scale = meta.params["scale"][0]

    def apply(chunk: Chunk, stats: dict) -> torch.Tensor:
        return chunk.xs[0] if scale is None else chunk.xs[0] * float(scale)

    return Program(apply)


def passthrough(xs: list[torch.Tensor], base: torch.Tensor | None, *, scale: list[float | None]) -> torch.Tensor:
    return run_whole(program, xs, base, {"scale": scale})


METHOD = Method(
    name="passthrough",
    kernel=passthrough,
    program=program,
    params=(Param("scale", float, default=None, per_model=True, doc="multiply the tensor by this"),),
    base="input",
    min_inputs=1,
    max_inputs=1,
    doc="Copy tensors from exactly one model per tensor (frankenmerges).",
)
