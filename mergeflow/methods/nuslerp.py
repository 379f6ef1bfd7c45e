"""nuslerp: slerp between two models by relative weight, row-wise or flattened, optionally
on task vectors from a base.

METHODS.md, "nuslerp": t = w1/(w0+w1) (0.5 when the sum is ~0), computed in the input dtype.
"""

from __future__ import annotations

import torch

from mergeflow.methods.base import Method, Param

UNIT_EPS = 1e-7
COLINEAR_EPS = 1e-8


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp(min=UNIT_EPS)


def spherical(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """Slerp per vector along the last dim; lerp where |sin θ| <= 1e-8.

    The colinear test is 1 - cos²θ <= 1e-16 (i.e. sin²θ), which catches antipodal vectors
    too: in float32 sin(acos(-1)) is 8.7e-8, not 0.
    """
    cos = (_unit(v0) * _unit(v1)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin_theta = torch.sin(theta)
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    return torch.where(colinear, (1 - t) * v0 + t * v1, out)


def spherical_shaped(v0: torch.Tensor, v1: torch.Tensor, t: float, *, flatten: bool,
                     row_wise: bool) -> torch.Tensor:
    """`spherical` over whole flattened tensors, vectors along dim 0 (row_wise) or the last dim."""
    shape = v0.shape
    if flatten:
        return spherical(v0.reshape(-1), v1.reshape(-1), t).reshape(shape)
    if row_wise:
        return spherical(v0.transpose(0, -1), v1.transpose(0, -1), t).transpose(0, -1).reshape(shape)
    return spherical(v0, v1, t)


def nuslerp(
    xs: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: list[float],
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
) -> torch.Tensor:
    """With a base: b + S(m0 - b, m1 - b); without: S(m0, m1)."""
    if len(xs) != 2:
        raise ValueError(f"nuslerp needs exactly two models besides the base, got {len(xs)}")
    total = weight[0] + weight[1]
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    opts = {"flatten": nuslerp_flatten, "row_wise": nuslerp_row_wise}
    if base is None:
        return spherical_shaped(xs[0], xs[1], t, **opts)
    return base + spherical_shaped(xs[0] - base, xs[1] - base, t, **opts)


METHOD = Method(
    name="nuslerp",
    kernel=nuslerp,
    params=(
        Param("weight", float, required=True, per_model=True, doc="the model's relative weight"),
        Param("nuslerp_flatten", bool, default=True, doc="treat each tensor as one vector"),
        Param("nuslerp_row_wise", bool, default=False,
              doc="without flatten: vectors along dim 0 instead of the last dim"),
    ),
    base="optional",
    min_inputs=2,
    max_inputs=2,
    rectify="common",
    doc="Slerp between two models by relative weight, optionally on task vectors from a base. "
        "Colinear test 1 - cos² <= 1e-16 (as mergekit) rather than |sin θ| < 1e-8 evaluated "
        "in float, which misses antipodal vectors.",
)
