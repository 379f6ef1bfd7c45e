"""nearswap: take the other model's value where it is close to the base's, else stay near base.

METHODS.md, "nearswap": w = clamp(t / max(|b - x|, 1e-6), 0, 1) elementwise; r = w x + (1-w) b.
"""

from __future__ import annotations

import torch

from mergeflow.methods.base import Method, Param
from mergeflow.methods.passes import Chunk, Meta, Program, run_whole


def program(meta: Meta) -> Program:
    if meta.inputs != 1 or not meta.base:
        raise ValueError(f"nearswap needs a base and exactly one other model, got {meta.inputs} others")
    t = meta.params["t"]

    def apply(chunk: Chunk, stats: dict) -> torch.Tensor:
        x, base = chunk.xs[0], chunk.base
        w = (t / (base - x).abs().clamp(min=1e-6)).clamp(min=0, max=1)
        return w * x + (1 - w) * base

    return Program(apply)


def nearswap(xs: list[torch.Tensor], base: torch.Tensor, *, t: float) -> torch.Tensor:
    return run_whole(program, xs, base, {"t": t})


METHOD = Method(
    name="nearswap",
    kernel=nearswap,
    program=program,
    params=(Param("t", float, required=True, low=0,
                  doc="distance below which the other model's value is taken whole"),),
    base="required",
    min_inputs=1,
    max_inputs=1,
    rectify="common",
    doc="Interpolate toward the other model in proportion to t / |base - other|.",
)
