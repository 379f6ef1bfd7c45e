"""ram and ramplus_tl: Reinforced Agent Merging on task vectors.

METHODS.md, "ram / ramplus_tl": an entry of a task vector is active when |T_i| > epsilon;
entries only one model changes are kept as they are (ramplus_tl scales them by a per-model
lambda), entries several models change are averaged over those models.
"""

from __future__ import annotations

import torch

from mergeflow.methods.base import Method, Param
from mergeflow.methods.linear import rounded_sum


def _active(tvs: list[torch.Tensor], epsilon: float):
    """(active masks a_i, unique = [c == 1], overlap = [c > 1], counts c clamped to >= 1)."""
    active = [t.abs() > epsilon for t in tvs]
    counts = torch.zeros(tvs[0].shape, dtype=torch.int64, device=tvs[0].device)
    for a in active:
        counts += a
    return active, counts == 1, counts > 1, counts.clamp(min=1)


def ram(xs: list[torch.Tensor], base: torch.Tensor, *, epsilon: float = 1e-5) -> torch.Tensor:
    """r = b + Σ_i (T_i a_i [c==1] + T_i a_i [c>1] / max(c, 1))."""
    if not xs:
        return base
    tvs = [x - base for x in xs]
    active, unique, overlap, counts = _active(tvs, epsilon)
    terms = []
    for t, a in zip(tvs, active):
        tz = t * a
        terms.append(tz * unique + tz * overlap / counts)
    return base + rounded_sum(terms)


def ramplus_lambdas(active, unique, overlap, *, r: float, alpha: float, epsilon: float):
    """λ_i = 1 + r clamp(ρ_i, 0, alpha), ρ_i = #(a_i & c>1) / max(#(a_i & c==1), epsilon),
    as float32 tensors of shape (1,)."""
    lambdas = []
    for a in active:
        shared = (a & overlap).sum().reshape(1)
        own = (a & unique).sum().reshape(1)
        rho = shared / own.clamp(min=epsilon)
        lambdas.append(1 + r * rho.clamp(min=0, max=alpha))
    return lambdas


def ramplus_tl(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    *,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
) -> torch.Tensor:
    """ram with each model's unique entries scaled by λ_i. The λ-scaled sum runs in float32
    (as in mergekit) and the result is rounded once to the compute dtype (deviation: mergekit
    returns float32 whatever the dtype)."""
    if not xs:
        return base
    tvs = [x - base for x in xs]
    active, unique, overlap, counts = _active(tvs, epsilon)
    lambdas = ramplus_lambdas(active, unique, overlap, r=r, alpha=alpha, epsilon=epsilon)
    terms = []
    for t, a, lam in zip(tvs, active, lambdas):
        tz = t * a
        terms.append(tz * unique * lam + tz * overlap / counts)
    return (base + rounded_sum(terms)).to(base.dtype)


_EPSILON = Param("epsilon", float, default=1e-5, low=0, doc="|T| above this counts as a change")

METHODS: tuple[Method, ...] = (
    Method(
        name="ram",
        kernel=ram,
        params=(_EPSILON,),
        base="required",
        min_inputs=0,
        rectify="base",
        row_separable=True,
        doc="RAM: keep entries one model changes, average entries several models change.",
    ),
    Method(
        name="ramplus_tl",
        kernel=ramplus_tl,
        params=(
            Param("r", float, default=0.1, doc="strength of the unique-entry boost"),
            Param("alpha", float, default=0.2, low=0, doc="cap on the shared/unique ratio"),
            _EPSILON,
        ),
        base="required",
        min_inputs=0,
        rectify="base",
        doc="RAM+ (tensor-local): RAM with unique entries boosted per model. "
            "Deviation: the result is in the compute dtype, not always float32.",
    ),
)
