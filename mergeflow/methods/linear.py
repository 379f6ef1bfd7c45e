"""linear: weighted average of the inputs (the base, if any, is just another input).

Elementwise: no reduction pass; each chunk is merged on its own."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from mergeflow.dtypes import accumulator_dtype
from mergeflow.methods.base import Method, Param
from mergeflow.methods.passes import Chunk, Meta, Program, run_whole


def rounded_sum(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """Σ terms accumulated in float32 (float64 for float64 terms), rounded once to their dtype.

    This is what torch's sum(0) over a stacked low-precision tensor computes (METHODS.md,
    "Sums over models") without materialising the stack. Like torch's sum it starts from
    +0, so a sum of negative zeros is +0.

    One or two terms take the dtype's own add: torch computes a bfloat16 or float16 `a + b`
    in float32 and rounds once, so it is the same sum, in one pass instead of four (the
    `+ 0.0` turns -0 into +0, as the accumulator's +0 start does).
    """
    terms = list(terms)
    if not terms:
        raise ValueError("cannot sum an empty list of tensors")
    if len(terms) <= 2:
        return (terms[0] + terms[1] if len(terms) == 2 else terms[0]) + 0.0
    dtype = terms[0].dtype
    acc = torch.zeros(terms[0].shape, dtype=accumulator_dtype(dtype), device=terms[0].device)
    for term in terms:
        acc.add_(term)
    return acc.to(dtype)


def weighted_sum(xs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ w_i x_i in float32 (float64 for float64 inputs), left unrounded.

    The weights are float32 (float64) values, not rounded to the inputs' dtype; each input
    is widened exactly, multiplied and added in the accumulator's precision, in input order.
    This is mergekit 0.1.5's linear; callers round the result once when they are done."""
    dtype = accumulator_dtype(xs[0].dtype)
    acc = torch.zeros(xs[0].shape, dtype=dtype, device=xs[0].device)
    for x, w in zip(xs, torch.tensor(weights, dtype=dtype, device=acc.device)):
        acc.addcmul_(x, w)  # the same op as mergekit (it may fuse the multiply-add)
    return acc


def program(meta: Meta) -> Program:
    """r = Σ w_i x_i (/ Σ w_i), computed in float32 (float64 for float64) with float32
    weights and rounded once to the inputs' dtype (METHODS.md, "linear")."""
    weight, normalize = list(meta.params["weight"]), meta.params["normalize"]
    total = torch.tensor(weight, dtype=accumulator_dtype(meta.dtype)).sum() if normalize else None
    if total is not None and float(total) == 0.0:
        raise ValueError("linear: the weights sum to 0, so they cannot be normalized; "
                         "set `normalize: false` or change the weights")

    def apply(chunk: Chunk, stats: dict) -> torch.Tensor:
        out = weighted_sum(chunk.xs, weight)
        if total is not None:
            out = out.div_(total.to(out.device))
        return out.to(chunk.xs[0].dtype)

    return Program(apply)


def linear(xs: list[torch.Tensor], base: torch.Tensor | None, *, weight: list[float], normalize: bool) -> torch.Tensor:
    return run_whole(program, xs, base, {"weight": weight, "normalize": normalize})


METHOD = Method(
    name="linear",
    kernel=linear,
    program=program,
    params=(
        Param("weight", float, required=True, per_model=True, doc="the model's weight"),
        Param("normalize", bool, default=True, doc="divide by the sum of the weights"),
    ),
    base="input",
    rectify="common",
    doc="Weighted average of the models (model soup).",
)
