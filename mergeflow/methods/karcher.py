"""karcher: the Karcher (Riemannian) mean of all inputs on the unit hypersphere.

METHODS.md, "karcher": equal weights 1/N over every input (a base is one more point),
iterated tangent steps from the normalised mean, rescaled by the mean input norm.
"""

from __future__ import annotations

import torch

from mergeflow.methods.base import Method, Param


def _units(xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(norms in float32 (float64 for float64), unit tensors in the compute dtype; 0 for 0)."""
    work = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    norms, units = [], []
    for x in xs:
        n = torch.linalg.vector_norm(x.to(work))
        norms.append(n)
        units.append(torch.zeros_like(x) if float(n) == 0.0 else (x / n).to(x.dtype))
    return norms, units


def _renormalised(v: torch.Tensor, tol: float, fallback: torch.Tensor | None = None) -> torch.Tensor:
    work = torch.float64 if v.dtype == torch.float64 else torch.float32
    n = torch.linalg.vector_norm(v.to(work))
    if float(n) < tol:
        return v if fallback is None else fallback.clone()
    return (v / n).to(v.dtype)


def _tangent(mean: torch.Tensor, units: list[torch.Tensor], alphas: list[float], tol: float) -> torch.Tensor:
    """Σ a_i (θ_i / sin θ_i)(u_i - cos θ_i · mean), skipping θ_i < tol."""
    tangent = torch.zeros_like(mean)
    for a, u in zip(alphas, units):
        cos = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
        theta = torch.arccos(cos)
        if float(theta) < tol:
            continue
        tangent += a * (theta / torch.sin(theta)) * (u - cos * mean)
    return tangent


def karcher_mean(units: list[torch.Tensor], alphas: list[float], *, max_iter: int,
                 tol: float) -> torch.Tensor:
    """The Karcher mean of unit tensors (all with norm > tol), weights normalised to sum 1."""
    total = sum(alphas)
    alphas = [a / total for a in alphas]
    mean = torch.zeros_like(units[0])
    for a, u in zip(alphas, units):
        mean += a * u
    mean = _renormalised(mean, tol, fallback=units[0])
    work = torch.float64 if mean.dtype == torch.float64 else torch.float32
    for _ in range(max_iter):
        tangent = _tangent(mean, units, alphas, tol)
        tn = torch.linalg.vector_norm(tangent.to(work))
        if float(tn) < tol:
            break
        mean = (torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)).to(mean.dtype)
        n = torch.linalg.vector_norm(mean.to(work))
        if float(n) > tol:
            mean = (mean / n).to(mean.dtype)
    return mean


def karcher(
    xs: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    max_iter: int = 10,
    tol: float = 1e-5,
    weight: list[float | None] | None = None,
) -> torch.Tensor:
    """(Σ_i ‖x_i‖ / N) · KarcherMean(x_i / ‖x_i‖); inputs with norm <= tol drop out of the mean.

    `weight` is accepted and ignored: every input weighs 1/N (METHODS.md)."""
    if len(xs) == 1:
        return xs[0]
    norms, units = _units(xs)
    alpha = 1.0 / len(xs)
    valid = [u for u, n in zip(units, norms) if float(n) > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    mean = karcher_mean(valid, [alpha] * len(valid), max_iter=max_iter, tol=tol)
    scale = sum(alpha * n for n in norms)
    return scale * mean


METHOD = Method(
    name="karcher",
    kernel=karcher,
    params=(
        Param("max_iter", int, default=10, low=0, doc="maximum number of tangent steps"),
        Param("tol", float, default=1e-5, low=0, doc="convergence tolerance"),
        Param("weight", float, default=None, per_model=True,
              doc="accepted for mergekit configs and ignored: all models weigh 1/N"),
    ),
    base="input",
    min_inputs=1,
    rectify="common",
    doc="Karcher mean on the hypersphere, equal weights over all models (weights ignored). "
        "Deviation: embedding tensors of different sizes are rectified like linear.",
)
