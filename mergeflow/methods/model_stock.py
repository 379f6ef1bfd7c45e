"""model_stock: interpolate between the base and the average of the others by their geometry.

METHODS.md, "model_stock": the interpolation ratio t comes from the mean pairwise cosine of
the task vectors, over whole tensors or per row (`filter_wise`).
"""

from __future__ import annotations

import torch

from mergeflow.methods.base import Method, Param


def _vectors(base: torch.Tensor, xs: list[torch.Tensor], filter_wise: bool):
    if not filter_wise:
        return base.reshape(-1), [x.reshape(-1) for x in xs]
    if base.dim() == 1:
        return base.unsqueeze(0), [x.unsqueeze(0) for x in xs]
    return base, xs


def mean_pairwise_cosine(offsets: list[torch.Tensor]) -> torch.Tensor:
    """Mean over pairs i<j of clamp(<o_i,o_j> / max(‖o_i‖‖o_j‖, 1e-6), -1, 1), along the last dim."""
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    return torch.stack(cosines).mean(dim=0).unsqueeze(-1)


def stock_ratio(cos: torch.Tensor, n: int) -> torch.Tensor:
    """t = N c / (1 + (N-1) c); where the denominator is ~0 (|.| < 1e-6), t = 0 (keep the base)."""
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos), (n * cos) / safe)


def model_stock(
    xs: list[torch.Tensor], base: torch.Tensor, *, filter_wise: bool = False
) -> torch.Tensor:
    """r = t · mean(x_i) + (1 - t) · b.

    mean(x_i) is Python's sum, left to right in the compute dtype (a rounding per step), as
    mergekit computes it, not accumulated in float32."""
    if len(xs) < 2:
        raise ValueError(f"model_stock needs at least two models besides the base, got {len(xs)}")
    b, ws = _vectors(base, xs, filter_wise)
    t = stock_ratio(mean_pairwise_cosine([w - b for w in ws]), len(ws))
    average = sum(ws) / len(ws)
    return (t * average + (1 - t) * b).reshape(base.shape)


METHOD = Method(
    name="model_stock",
    kernel=model_stock,
    params=(Param("filter_wise", bool, default=False,
                  doc="compute the ratio per row instead of per tensor"),),
    base="required",
    min_inputs=2,
    rectify="common",
    doc="Model Stock: move from the base toward the models' average by their mutual angle. "
        "Where 1 + (N-1)cos is ~0 the base is kept (as mergekit).",
)
