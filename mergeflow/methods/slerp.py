"""slerp: spherical interpolation between the base and one other model.

METHODS.md, "slerp": computed in float32 (float64 stays float64), result cast back to the
base's dtype; nearly parallel tensors (|cos| > 0.9995) fall back to linear interpolation.
Two reduction passes (the norms, then the cosine of the normalised tensors, per segment as
in methods/passes.py), then an elementwise apply with the two coefficients.
"""

from __future__ import annotations

import torch

from mergeflow.methods.base import Method, Param
from mergeflow.methods.passes import Chunk, Meta, Pass, Program, as_tensor, run_whole

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def _work(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pair(chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
    work = _work(chunk.base.dtype)
    return chunk.base.to(work), chunk.xs[0].to(work)


def coefficients(dot: torch.Tensor, t: float, work: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients (on the raw tensors a, b) of slerp from a (t=0) to b (t=1), given the
    cosine of the normalised tensors."""
    tt = torch.tensor(t, dtype=work)
    if bool(dot.abs() > DOT_THRESHOLD):
        return 1 - tt, tt
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return torch.sin((1 - tt) * theta) / sin_theta, torch.sin(tt * theta) / sin_theta


def program(meta: Meta) -> Program:
    """r = sin((1-t)θ)/sin θ · b + sin(tθ)/sin θ · x; t = 0 gives the base, t = 1 the other."""
    if meta.inputs != 1 or not meta.base:
        raise ValueError(f"slerp needs a base and exactly one other model, got {meta.inputs} others")
    t, work = meta.params["t"], _work(meta.dtype)

    def norms(chunk: Chunk, stats: dict) -> dict:
        a, b = _pair(chunk)
        return {"a": chunk.norms(a), "b": chunk.norms(b)}

    def unit_norms(blocks: list[dict], stats: dict) -> dict:
        out = {}
        for k in ("a", "b"):
            n = as_tensor(sum((blk[k] for blk in blocks[1:]), blocks[0][k]).value(), work)
            out[("norm", k)] = torch.where(n > NORM_EPS, n, torch.ones_like(n))  # ~0: left as is
        return out

    def cosine(chunk: Chunk, stats: dict) -> dict:
        a, b = _pair(chunk)
        return {"dot": chunk.sums((a / stats[("norm", "a")]) * (b / stats[("norm", "b")]))}

    def coefs(blocks: list[dict], stats: dict) -> dict:
        dot = as_tensor(sum((blk["dot"] for blk in blocks[1:]), blocks[0]["dot"]).value(), work).clamp(-1, 1)
        return {"coef": coefficients(dot, t, work)}

    def apply(chunk: Chunk, stats: dict) -> torch.Tensor:
        a, b = _pair(chunk)
        ca, cb = (c.to(a.device) for c in stats.get("coef") or _linear(t, work))
        return (ca * a + cb * b).to(chunk.base.dtype)

    return Program(apply, (Pass(norms, unit_norms), Pass(cosine, coefs)))


def _linear(t: float, work: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    tt = torch.tensor(t, dtype=work)
    return 1 - tt, tt


def slerp(xs: list[torch.Tensor], base: torch.Tensor, *, t: float) -> torch.Tensor:
    if len(xs) != 1 or base is None:
        raise ValueError(f"slerp needs a base and exactly one other model, got {len(xs)} others")
    return run_whole(program, xs, base, {"t": t})


METHOD = Method(
    name="slerp",
    kernel=slerp,
    program=program,
    params=(Param("t", float, required=True, low=0, high=1,
                  doc="interpolation factor: 0 is the base, 1 the other model"),),
    base="required",
    min_inputs=1,
    max_inputs=1,
    rectify="common",
    doc="Spherical linear interpolation between the base and one other model.",
)
