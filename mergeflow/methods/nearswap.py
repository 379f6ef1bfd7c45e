"""nearswap: take the other model's value where it is close to the base's, else stay near base.

METHODS.md, "nearswap": w = clamp(t / max(|b - x|, 1e-6), 0, 1) elementwise; r = w x + (1-w) b.
"""

from __future__ import annotations

import torch

from mergeflow.methods.base import Method, Param


def nearswap(xs: list[torch.Tensor], base: torch.Tensor, *, t: float) -> torch.Tensor:
    if len(xs) != 1:
        raise ValueError(f"nearswap needs a base and exactly one other model, got {len(xs)} others")
    x = xs[0]
    w = (t / (base - x).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return w * x + (1 - w) * base


METHOD = Method(
    name="nearswap",
    kernel=nearswap,
    params=(Param("t", float, required=True, low=0,
                  doc="distance below which the other model's value is taken whole"),),
    base="required",
    min_inputs=1,
    max_inputs=1,
    rectify="common",
    row_separable=True,
    doc="Interpolate toward the other model in proportion to t / |base - other|.",
)
