"""multislerp: barycentric interpolation of several models on a hypersphere.

METHODS.md, "multislerp": project the (task-vector) inputs to the unit sphere, take one
tangent-space step at their weighted mean, map back and scale by the weighted mean norm.
"""

from __future__ import annotations

import torch

from mergeflow.methods.base import Method, Param


def _tangent_step(units: torch.Tensor, w: torch.Tensor, mean: torch.Tensor, eps: float) -> torch.Tensor:
    """exp_mean(Σ w_i (u_i - (u_i·mean) mean)) with the tangent norm offset by eps."""
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = ((units - dots * mean) * w.view(-1, 1)).sum(0)
    theta = torch.linalg.vector_norm(tangent) + eps
    return mean * torch.cos(theta) + tangent * (torch.sin(theta) / theta)


def multislerp(
    xs: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: list[float],
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """One-step spherical barycentre of the inputs (minus the base, if any)."""
    if len(xs) == 1:
        return xs[0]
    stacked = torch.stack(xs)
    if base is not None:
        stacked = stacked - base
    flat = stacked.reshape(len(xs), -1)
    w = torch.tensor(weight, dtype=flat.dtype, device=flat.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if bool(mean_norm < eps):
        if len(xs) != 2:
            raise ValueError(
                "multislerp: the weighted mean of the normalised inputs is zero (antipodal "
                "inputs whose weights cancel); change the weights")
        out = stacked[0] * w[0] + stacked[1] * w[1]
    else:
        out = _tangent_step(units, w, mean / mean_norm, eps) * (norms.squeeze(-1) * w).sum()
    out = out.reshape(xs[0].shape)
    return out if base is None else out + base


METHOD = Method(
    name="multislerp",
    kernel=multislerp,
    params=(
        Param("weight", float, required=True, per_model=True, doc="the model's weight"),
        Param("normalize_weights", bool, default=True, doc="make the weights sum to 1"),
        Param("eps", float, default=1e-8, low=0, doc="numerical-stability constant"),
    ),
    base="optional",
    min_inputs=1,
    rectify="common",
    doc="Barycentric interpolation of several models on a hypersphere (one tangent step). "
        "Two antipodal inputs fall back to their weighted sum; more is an error.",
)
