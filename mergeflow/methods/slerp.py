"""slerp: spherical interpolation between the base and one other model.

METHODS.md, "slerp": computed in float32 (float64 stays float64), result cast back to the
base's dtype; nearly parallel tensors (|cos| > 0.9995) fall back to linear interpolation.
"""

from __future__ import annotations

import torch

from mergeflow.methods.base import Method, Param

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8
CHUNK = 1024 * 1024  # elements per partial norm / dot (mergekit 0.1.5's summation order)


def _chunks(v: torch.Tensor) -> list[torch.Tensor]:
    """Consecutive CHUNK-element slices of a (1, N) tensor."""
    return [v[:, start : start + CHUNK] for start in range(0, v.shape[1], CHUNK)]


def _norm(v: torch.Tensor) -> torch.Tensor:
    """‖v‖ of a (1, N) tensor as the norm of its chunks' norms, shape (1, 1); 1 when
    ‖v‖ <= 1e-8 (a near-zero tensor is left as is)."""
    parts = [torch.linalg.vector_norm(c, dim=1, keepdim=True) for c in _chunks(v)]
    n = torch.linalg.vector_norm(torch.stack(parts), dim=0)
    return torch.where(n > NORM_EPS, n, torch.ones_like(n))


def slerp_coefficients(a: torch.Tensor, b: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients (on the raw tensors a, b) of slerp from a (t=0) to b (t=1).

    Norms and the cosine are summed chunk by chunk (1M elements), in the order mergekit
    0.1.5 sums them, so float32 results agree bit for bit on tensors of any size."""
    tt = torch.tensor(t, dtype=a.dtype, device=a.device)
    if a.numel() == 0:
        return 1 - tt, tt
    a, b = a.reshape(1, -1), b.reshape(1, -1)
    norm_a, norm_b = _norm(a), _norm(b)
    parts = [((x / norm_a) * (y / norm_b)).sum(dim=1, keepdim=True) for x, y in zip(_chunks(a), _chunks(b))]
    dot = torch.stack(parts).sum(dim=0).clamp(-1, 1).reshape(())
    if bool(dot.abs() > DOT_THRESHOLD):
        return 1 - tt, tt
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return torch.sin((1 - tt) * theta) / sin_theta, torch.sin(tt * theta) / sin_theta


def slerp(xs: list[torch.Tensor], base: torch.Tensor, *, t: float) -> torch.Tensor:
    """r = sin((1-t)θ)/sin θ · b + sin(tθ)/sin θ · x; t = 0 gives the base, t = 1 the other."""
    if len(xs) != 1 or base is None:
        raise ValueError(f"slerp needs a base and exactly one other model, got {len(xs)} others")
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    a, b = base.to(work), xs[0].to(work)
    coef_a, coef_b = slerp_coefficients(a, b, t)
    return (coef_a * a + coef_b * b).to(base.dtype)


METHOD = Method(
    name="slerp",
    kernel=slerp,
    params=(Param("t", float, required=True, low=0, high=1,
                  doc="interpolation factor: 0 is the base, 1 the other model"),),
    base="required",
    min_inputs=1,
    max_inputs=1,
    rectify="common",
    doc="Spherical linear interpolation between the base and one other model.",
)
