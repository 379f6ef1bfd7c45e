"""sce: select high-variance entries, weight task vectors by energy, erase sign conflicts.

METHODS.md, "sce": T_i = x_i - b; optional top-k selection by variance across models;
unweighted sign consensus; weights q_i = mean(T_i²) normalised to sum 1.
"""

from __future__ import annotations

import torch

from mergeflow.methods.base import Method, Param
from mergeflow.methods.linear import rounded_sum
from mergeflow.methods.task_arithmetic import consensus_masks


def select_mask(tvs: list[torch.Tensor], select_topk: float) -> torch.Tensor:
    """Positions among the top int(count_nonzero(v) * select_topk) of the variance v across
    models (population variance, in the compute dtype). Equal variances at the cut are
    picked as torch.topk picks them (as mergekit 0.1.5; not necessarily lower index first)."""
    var = torch.var(torch.stack(tvs), dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * select_topk)
    keep = torch.zeros(var.numel(), dtype=torch.bool, device=var.device)
    if k > 0:
        keep[torch.topk(var.abs().reshape(-1), k=k, largest=True).indices] = True
    return keep.reshape(var.shape)


def energy_weights(tvs: list[torch.Tensor]) -> list[float]:
    """q_i = mean(T_i²) in the compute dtype, normalised to sum 1 (uniform if the sum < 1e-6).

    Returned as Python floats holding the compute-dtype values exactly."""
    q = torch.stack([t.square().mean() for t in tvs])
    total = float(q.sum())
    if abs(total) < 1e-6:
        q = torch.ones_like(q) / len(tvs)
    else:
        q = q / total
    return [float(v) for v in q]


def sce(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    *,
    select_topk: float = 1.0,
    int8_mask: bool = False,
) -> torch.Tensor:
    """r = b + Σ T_i q_i E_i / clamp(Σ q_i E_i, min=1e-6). `int8_mask` has no effect here."""
    if not xs:
        return base
    tvs = [x - base for x in xs]
    if select_topk < 1:
        keep = select_mask(tvs, select_topk)
        tvs = [t * keep for t in tvs]
    erase = consensus_masks(tvs)
    q = [torch.tensor(v, dtype=base.dtype, device=base.device) for v in energy_weights(tvs)]
    weights = [qi * e for qi, e in zip(q, erase)]
    merged = rounded_sum(t * w for t, w in zip(tvs, weights))
    norm = rounded_sum(weights).clamp(min=1e-6)
    return base + merged / norm


METHOD = Method(
    name="sce",
    kernel=sce,
    params=(
        Param("select_topk", float, default=1.0, low=0, high=1,
              doc="fraction of the nonzero-variance positions kept"),
        Param("int8_mask", bool, default=False, doc="memory saving in mergekit; no effect here"),
    ),
    base="required",
    min_inputs=0,
    rectify="base",
    doc="SCE: select by variance, calculate energy weights, erase sign conflicts. Equal "
        "variances at the top-k cut are picked as torch.topk picks them (as mergekit).",
)
