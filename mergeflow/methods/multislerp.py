"""multislerp: barycentric interpolation of several models on a hypersphere.

METHODS.md, "multislerp": project the (task-vector) inputs to the unit sphere, take one
tangent-space step at their weighted mean, map back and scale by the weighted mean norm.
Four reduction passes, each a whole-tensor statistic the next step needs: the inputs' norms,
the norm of their weighted mean, the inputs' dots with the normalised mean, the norm of the
tangent; then an elementwise apply.
"""

from __future__ import annotations

import torch

from mergeflow.methods.base import Method, Param
from mergeflow.methods.passes import Chunk, Meta, Pass, Program, as_tensor, run_whole


def _total(blocks: list[dict], key) -> float:
    return sum((b[key] for b in blocks[1:]), blocks[0][key]).value()


def program(meta: Meta) -> Program:
    """One-step spherical barycentre of the inputs (minus the base, if any)."""
    p, n, dtype = meta.params, meta.inputs, meta.dtype
    if n == 1:
        return Program(lambda chunk, stats: chunk.xs[0])
    eps = p.get("eps", 1e-8)
    w = torch.tensor(p["weight"], dtype=dtype)
    if p.get("normalize_weights", True):
        w = w / w.sum()

    def flat(chunk: Chunk) -> torch.Tensor:
        stacked = torch.stack(chunk.xs)
        if chunk.base is not None:
            stacked = stacked - chunk.base
        return stacked.reshape(n, -1)

    def units(chunk: Chunk, stats: dict) -> torch.Tensor:
        return flat(chunk) / (stats["norms"].to(chunk.xs[0].device) + eps)

    def mean(chunk: Chunk, stats: dict) -> torch.Tensor:
        return (units(chunk, stats) * w.to(chunk.xs[0].device).view(-1, 1)).sum(0)

    def direction(chunk: Chunk, stats: dict) -> torch.Tensor:
        return mean(chunk, stats) / stats["mean_norm"].to(chunk.xs[0].device)

    def tangent(chunk: Chunk, stats: dict) -> torch.Tensor:
        u, m = units(chunk, stats), direction(chunk, stats)
        dots = stats["dots"].to(u.device)
        return ((u - dots * m) * w.to(u.device).view(-1, 1)).sum(0)

    def norms(chunk, stats):
        f = flat(chunk)
        return {i: chunk.norms(f[i]) for i in range(n)}

    def norms_done(blocks, stats):
        return {"norms": torch.stack([as_tensor(_total(blocks, i), dtype) for i in range(n)]).view(-1, 1)}

    def mean_norm_done(blocks, stats):
        value = as_tensor(_total(blocks, "m"), dtype)
        if bool(value < eps) and n != 2:
            raise ValueError("multislerp: the weighted mean of the normalised inputs is zero (antipodal "
                             "inputs whose weights cancel); change the weights")
        return {"mean_norm": value, "antipodal": bool(value < eps)}

    def dots(chunk, stats):
        u, m = units(chunk, stats), direction(chunk, stats)
        return {i: chunk.sums(u[i] * m) for i in range(n)}

    def dots_done(blocks, stats):
        return {"dots": torch.stack([as_tensor(_total(blocks, i), dtype) for i in range(n)]).view(-1, 1)}

    def theta_done(blocks, stats):
        return {"theta": as_tensor(_total(blocks, "t"), dtype) + eps}

    def apply(chunk: Chunk, stats: dict) -> torch.Tensor:
        dev = chunk.xs[0].device
        if stats["antipodal"]:
            f = flat(chunk)
            out = f[0] * w[0].to(dev) + f[1] * w[1].to(dev)
        else:
            theta = stats["theta"].to(dev)
            step = direction(chunk, stats) * torch.cos(theta) + tangent(chunk, stats) * (torch.sin(theta) / theta)
            out = step * (stats["norms"].squeeze(-1) * w).sum().to(dev)
        out = out.reshape(chunk.xs[0].shape)
        return out if chunk.base is None else out + chunk.base

    skip_tangent = lambda stats: stats["antipodal"]  # noqa: E731
    return Program(apply, (
        Pass(norms, norms_done),
        Pass(lambda chunk, stats: {"m": chunk.norms(mean(chunk, stats))}, mean_norm_done),
        Pass(dots, dots_done, skip_tangent),
        Pass(lambda chunk, stats: {"t": chunk.norms(tangent(chunk, stats))}, theta_done, skip_tangent),
    ))


def multislerp(
    xs: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: list[float],
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    return run_whole(program, xs, base, {"weight": weight, "normalize_weights": normalize_weights, "eps": eps})


METHOD = Method(
    name="multislerp",
    kernel=multislerp,
    program=program,
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
