"""model_stock: interpolate between the base and the average of the others by their geometry.

METHODS.md, "model_stock": the interpolation ratio t comes from the mean pairwise cosine of
the task vectors, over whole tensors (one reduction pass: norms and pairwise dots) or per
row (`filter_wise`: each chunk holds whole rows, so the apply does everything).
"""

from __future__ import annotations

import torch

from mergeflow.methods.base import Method, Param
from mergeflow.methods.passes import Chunk, Meta, Pass, Program, as_tensor, run_whole


def _vectors(base: torch.Tensor, xs: list[torch.Tensor], filter_wise: bool):
    if not filter_wise:
        return base.reshape(-1), [x.reshape(-1) for x in xs]
    if base.dim() == 1:
        return base.unsqueeze(0), [x.unsqueeze(0) for x in xs]
    return base, xs


def pair_cosines(norms: list[torch.Tensor], dots: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor:
    """Mean over pairs i<j of clamp(<o_i,o_j> / max(‖o_i‖‖o_j‖, 1e-6), -1, 1)."""
    cosines = []
    for i in range(len(norms)):
        for j in range(i + 1, len(norms)):
            cosines.append((dots[i, j] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    return torch.stack(cosines).mean(dim=0).unsqueeze(-1)


def mean_pairwise_cosine(offsets: list[torch.Tensor]) -> torch.Tensor:
    """pair_cosines of vectors along the last dim."""
    norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]
    dots = {(i, j): (a * b).sum(dim=-1) for i, a in enumerate(offsets) for j, b in enumerate(offsets) if i < j}
    return pair_cosines(norms, dots)


def stock_ratio(cos: torch.Tensor, n: int) -> torch.Tensor:
    """t = N c / (1 + (N-1) c); where the denominator is ~0 (|.| < 1e-6), t = 0 (keep the base)."""
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos), (n * cos) / safe)


def _blend(t: torch.Tensor, ws: list[torch.Tensor], b: torch.Tensor) -> torch.Tensor:
    """t · mean(w_i) + (1 - t) · b; mean(w_i) is Python's sum, left to right in the compute
    dtype (a rounding per step), as mergekit computes it, not accumulated in float32."""
    average = sum(ws) / len(ws)
    return t * average + (1 - t) * b


def program(meta: Meta) -> Program:
    """r = t · mean(x_i) + (1 - t) · b."""
    n = meta.inputs
    if n < 2:
        raise ValueError(f"model_stock needs at least two models besides the base, got {n}")
    if meta.params.get("filter_wise", False):
        def rows(chunk: Chunk, stats: dict) -> torch.Tensor:
            b, ws = _vectors(chunk.base, chunk.xs, True)
            t = stock_ratio(mean_pairwise_cosine([w - b for w in ws]), n)
            return _blend(t, ws, b).reshape(chunk.base.shape)
        return Program(rows, row_local=True)
    dtype = meta.dtype

    def offsets(chunk: Chunk) -> list[torch.Tensor]:
        return [x - chunk.base for x in chunk.xs]

    def partial(chunk: Chunk, stats: dict) -> dict:
        o = offsets(chunk)
        out: dict = {("norm", i): chunk.norms(v) for i, v in enumerate(o)}
        out |= {(i, j): chunk.sums(o[i] * o[j]) for i in range(n) for j in range(i + 1, n)}
        return out

    def ratio(blocks: list[dict], stats: dict) -> dict:
        def total(key):
            return as_tensor(sum((b[key] for b in blocks[1:]), blocks[0][key]).value(), dtype)
        norms = [total(("norm", i)) for i in range(n)]
        dots = {(i, j): total((i, j)) for i in range(n) for j in range(i + 1, n)}
        return {"t": stock_ratio(pair_cosines(norms, dots), n)}

    def apply(chunk: Chunk, stats: dict) -> torch.Tensor:
        return _blend(stats["t"].to(chunk.base.device), list(chunk.xs), chunk.base)

    return Program(apply, (Pass(partial, ratio),))


def model_stock(xs: list[torch.Tensor], base: torch.Tensor, *, filter_wise: bool = False) -> torch.Tensor:
    if len(xs) < 2:
        raise ValueError(f"model_stock needs at least two models besides the base, got {len(xs)}")
    return run_whole(program, xs, base, {"filter_wise": filter_wise})


METHOD = Method(
    name="model_stock",
    kernel=model_stock,
    program=program,
    params=(Param("filter_wise", bool, default=False,
                  doc="compute the ratio per row instead of per tensor"),),
    base="required",
    min_inputs=2,
    rectify="common",
    doc="Model Stock: move from the base toward the models' average by their mutual angle. "
        "Where 1 + (N-1)cos is ~0 the base is kept (as mergekit).",
)
