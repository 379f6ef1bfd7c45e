"""nuslerp: slerp between two models by relative weight, row-wise or flattened, optionally
on task vectors from a base.

METHODS.md, "nuslerp": t = w1/(w0+w1) (0.5 when the sum is ~0), computed in the input dtype.
Flattened (the default): two reduction passes (the norms, then the cosine of the unit
tensors) and an elementwise apply. Vectors along the last dim: each chunk holds whole
vectors, so the apply does everything. Vectors along dim 0 (`nuslerp_row_wise`): per-column
statistics accumulated in float64 over the rows (passes.Columns).
"""

from __future__ import annotations

import torch

from mergeflow.methods.base import Method, Param
from mergeflow.methods.passes import Chunk, Columns, Meta, Pass, Program, as_tensor, run_whole

UNIT_EPS = 1e-7
COLINEAR_EPS = 1e-8


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp(min=UNIT_EPS)


def _combine(cos: torch.Tensor, v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """Slerp of v0, v1 given the cosine of their unit vectors; lerp where |sin θ| <= 1e-8.

    The colinear test is 1 - cos²θ <= 1e-16 (i.e. sin²θ), which catches antipodal vectors
    too: in float32 sin(acos(-1)) is 8.7e-8, not 0.
    """
    cos = cos.clamp(-1, 1)
    colinear = (1 - cos.square()) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin_theta = torch.sin(theta)
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    return torch.where(colinear, (1 - t) * v0 + t * v1, out)


def spherical(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """Slerp per vector along the last dim."""
    return _combine((_unit(v0) * _unit(v1)).sum(dim=-1, keepdim=True), v0, v1, t)


def _vectors(chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
    x0, x1 = chunk.xs
    if chunk.base is None:
        return x0, x1
    return x0 - chunk.base, x1 - chunk.base


def program(meta: Meta) -> Program:
    """With a base: b + S(m0 - b, m1 - b); without: S(m0, m1)."""
    if meta.inputs != 2:
        raise ValueError(f"nuslerp needs exactly two models besides the base, got {meta.inputs}")
    p = meta.params
    total = p["weight"][0] + p["weight"][1]
    t = 0.5 if abs(total) < 1e-6 else p["weight"][1] / total

    def done(chunk: Chunk, merged: torch.Tensor) -> torch.Tensor:
        return merged if chunk.base is None else chunk.base + merged

    if not p.get("nuslerp_flatten", True) and not p.get("nuslerp_row_wise", False):
        return Program(lambda chunk, stats: done(chunk, spherical(*_vectors(chunk), t)), row_local=True)
    if p.get("nuslerp_flatten", True):
        return _flat(meta.dtype, t, done)
    return _columns(meta.dtype, t, done)


def _flat(dtype: torch.dtype, t: float, done) -> Program:
    """The whole tensor is one vector."""
    def norms(chunk: Chunk, stats: dict) -> dict:
        v0, v1 = _vectors(chunk)
        return {0: chunk.norms(v0), 1: chunk.norms(v1)}

    def units(blocks: list[dict], stats: dict) -> dict:
        return {("norm", k): as_tensor(sum((b[k] for b in blocks[1:]), blocks[0][k]).value(), dtype).clamp(min=UNIT_EPS)
                for k in (0, 1)}

    def cosine(chunk: Chunk, stats: dict) -> dict:
        v0, v1 = _vectors(chunk)
        return {"cos": chunk.sums((v0 / stats[("norm", 0)]) * (v1 / stats[("norm", 1)]))}

    def angle(blocks: list[dict], stats: dict) -> dict:
        return {"cos": as_tensor(sum((b["cos"] for b in blocks[1:]), blocks[0]["cos"]).value(), dtype)}

    def apply(chunk: Chunk, stats: dict) -> torch.Tensor:
        v0, v1 = _vectors(chunk)
        return done(chunk, _combine(stats["cos"].to(v0.device), v0, v1, t))

    return Program(apply, (Pass(norms, units), Pass(cosine, angle)))


def _columns(dtype: torch.dtype, t: float, done) -> Program:
    """Vectors along dim 0: one per position of the other dims."""
    def squares(chunk: Chunk, stats: dict) -> dict:
        v0, v1 = _vectors(chunk)
        return {k: Columns(v.double().square().sum(0)) for k, v in ((0, v0), (1, v1))}

    def units(blocks: list[dict], stats: dict) -> dict:
        out = {}
        for k in (0, 1):
            total = sum((b[k] for b in blocks[1:]), blocks[0][k]).sums
            out[("norm", k)] = total.sqrt().float().to(dtype).clamp(min=UNIT_EPS)
        return out

    def cosine(chunk: Chunk, stats: dict) -> dict:
        v0, v1 = _vectors(chunk)
        u = (v0 / stats[("norm", 0)]) * (v1 / stats[("norm", 1)])
        return {"cos": Columns(u.double().sum(0))}

    def angle(blocks: list[dict], stats: dict) -> dict:
        return {"cos": sum((b["cos"] for b in blocks[1:]), blocks[0]["cos"]).sums.float().to(dtype)}

    def apply(chunk: Chunk, stats: dict) -> torch.Tensor:
        v0, v1 = _vectors(chunk)
        return done(chunk, _combine(stats["cos"].to(v0.device), v0, v1, t))

    return Program(apply, (Pass(squares, units), Pass(cosine, angle)))


def nuslerp(
    xs: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: list[float],
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
) -> torch.Tensor:
    if len(xs) != 2:
        raise ValueError(f"nuslerp needs exactly two models besides the base, got {len(xs)}")
    return run_whole(program, xs, base, {"weight": weight, "nuslerp_flatten": nuslerp_flatten,
                                         "nuslerp_row_wise": nuslerp_row_wise})


METHOD = Method(
    name="nuslerp",
    kernel=nuslerp,
    program=program,
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
        "in float, which misses antipodal vectors. With nuslerp_row_wise, the per-column "
        "statistics are summed in float64.",
)
