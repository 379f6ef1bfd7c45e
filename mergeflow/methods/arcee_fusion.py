"""arcee_fusion: take the other model's change only where it is unusually important.

METHODS.md, "arcee_fusion": importance = |x - b| · KL(softmax(x) ‖ softmax(b)) per row (along
the last dim, so each chunk holds whole rows); entries with importance >= median + 1.5 IQR take
x, the rest keep b. The quartiles are exact at any size: sorted[floor(q (n-1))] found by radix
selection over the importance values (methods/select.py), no sort and no sample.
"""

from __future__ import annotations

import math

import torch

from mergeflow.methods import select
from mergeflow.methods.base import Method
from mergeflow.methods.passes import Chunk, Meta, Program, run_whole

SOFTMAX_EPS = 1e-8
QUARTILES = (0.25, 0.5, 0.75)


def importance(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|x - b| times the KL divergence of the rows' softmaxes (along the last dim)."""
    p = torch.softmax(x, dim=-1) + SOFTMAX_EPS
    q = torch.softmax(base, dim=-1) + SOFTMAX_EPS
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (x - base).abs() * kl


def _scores(chunk: Chunk) -> torch.Tensor:
    x, base = chunk.xs[0], chunk.base
    if x.dim() == 0:
        return importance(x.reshape(1), base.reshape(1)).reshape(())
    return importance(x, base)


def program(meta: Meta) -> Program:
    """r = b + (x - b) · [I >= median + 1.5 (Q3 - Q1)], in the compute dtype (deviation:
    mergekit's result is float32 whatever the dtype; the values agree after rounding)."""
    if meta.inputs != 1 or not meta.base:
        raise ValueError(f"arcee_fusion needs a base and exactly one other model, got {meta.inputs} others")
    n, dtype = math.prod(meta.shape), meta.dtype
    ranks = tuple(n - 1 - int(q * (n - 1)) for q in QUARTILES)  # sorted[i] is rank n-1-i from the top
    quartiles = select.Selection("quartiles", lambda chunk, stats: select.keys(_scores(chunk)), ranks,
                                 coarse=dtype == torch.bfloat16)

    def apply(chunk: Chunk, stats: dict) -> torch.Tensor:
        x, base = chunk.xs[0], chunk.base
        q1, median, q3 = (torch.tensor(select.key_value(c.key)).to(dtype) for c in stats["quartiles"])
        threshold = median + 1.5 * (q3 - q1)
        return base + (x - base) * (_scores(chunk) >= threshold.to(x.device))

    return Program(apply, select.passes([quartiles]) if n else (), row_local=True)


def arcee_fusion(xs: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    if len(xs) != 1:
        raise ValueError(f"arcee_fusion needs a base and exactly one other model, got {len(xs)} others")
    return run_whole(program, xs, base, {})


METHOD = Method(
    name="arcee_fusion",
    kernel=arcee_fusion,
    program=program,
    params=(),
    base="required",
    min_inputs=1,
    max_inputs=1,
    rectify="common",
    doc="Arcee Fusion: keep the other model's changes whose KL-weighted size is an outlier. "
        "The quartiles are exact at any size (mergekit samples 1e6 entries of larger tensors). "
        "Deviation: the result is in the compute dtype, not float32.",
)
