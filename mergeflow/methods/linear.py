"""linear: weighted average of the inputs (the base, if any, is just another input)."""

from __future__ import annotations

import torch

from mergeflow.methods.base import Method, Param


def weighted_sum(xs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ w_i x_i with each product in the inputs' dtype, accumulated in float32, rounded once.

    This is what torch's sum(0) over a stacked low-precision tensor computes (METHODS.md,
    "Sums over models") without materialising the stack.
    """
    dtype = xs[0].dtype
    acc = torch.zeros(xs[0].shape, dtype=torch.float32, device=xs[0].device)
    for x, w in zip(xs, weights):
        wt = torch.tensor(w, dtype=dtype, device=x.device)
        acc.add_(x * wt)
    return acc.to(dtype)


def linear(xs: list[torch.Tensor], base: torch.Tensor | None, *, weight: list[float], normalize: bool) -> torch.Tensor:
    dtype = xs[0].dtype
    out = weighted_sum(xs, weight)
    if normalize:
        total = torch.tensor(weight, dtype=dtype).sum()
        if float(total) == 0.0:
            raise ValueError("linear: the weights sum to 0, so they cannot be normalized; "
                             "set `normalize: false` or change the weights")
        out = out / total.to(out.device)
    return out


METHOD = Method(
    name="linear",
    kernel=linear,
    params=(
        Param("weight", float, required=True, per_model=True, doc="the model's weight"),
        Param("normalize", bool, default=True, doc="divide by the sum of the weights"),
    ),
    base="input",
    rectify="common",
    doc="Weighted average of the models (model soup).",
)
