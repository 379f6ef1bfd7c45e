"""sce: select high-variance entries, weight task vectors by energy, erase sign conflicts.

METHODS.md, "sce": T_i = x_i - b; optional top-k selection by variance across models;
unweighted sign consensus; weights q_i = mean(T_i²) normalised to sum 1. As passes: with
select_topk < 1, the count of nonzero variances, then the exact top-k cut of |variance|
(methods/select.py); then the energies; then an elementwise apply.
"""

from __future__ import annotations

import math

import torch

from mergeflow.methods import select
from mergeflow.methods.base import Method, Param
from mergeflow.methods.linear import rounded_sum
from mergeflow.methods.passes import Chunk, Meta, Pass, Program, run_whole
from mergeflow.methods.task_arithmetic import consensus_masks


def variance(tvs: list[torch.Tensor]) -> torch.Tensor:
    """Population variance across models, elementwise, in the compute dtype."""
    return torch.var(torch.stack(tvs), dim=0, unbiased=False)


def energy_weights(q: torch.Tensor) -> list[torch.Tensor]:
    """q_i = mean(T_i²) (compute dtype) normalised to sum 1 (uniform if the sum < 1e-6)."""
    total = float(q.sum())
    q = torch.ones_like(q) / len(q) if abs(total) < 1e-6 else q / total
    return [torch.tensor(float(v), dtype=q.dtype) for v in q]


def program(meta: Meta) -> Program:
    """r = b + Σ T_i q_i E_i / clamp(Σ q_i E_i, min=1e-6). `int8_mask` has no effect here."""
    if not meta.inputs:
        return Program(lambda chunk, stats: chunk.base)
    topk, dtype, n = meta.params.get("select_topk", 1.0), meta.dtype, math.prod(meta.shape)
    selecting = topk < 1

    def tvs(chunk: Chunk) -> list[torch.Tensor]:
        return [x - chunk.base for x in chunk.xs]

    def kept(chunk: Chunk, stats: dict) -> list[torch.Tensor]:
        t = tvs(chunk)
        if not selecting:
            return t
        k = stats["k"]
        if k >= n:
            return t
        keep = torch.zeros(t[0].shape, dtype=torch.bool, device=t[0].device)
        if k > 0:
            keep = select.window(variance(t).abs(), chunk, "var", 0, k - 1, None, stats["var"][0])
        return [v * keep for v in t]

    def nonzero(chunk, stats):
        return {"nz": int(torch.count_nonzero(variance(tvs(chunk))))}

    def cut_rank(blocks, stats):
        k = int(sum(b["nz"] for b in blocks) * topk)
        return {"k": k}

    def energies(chunk, stats):
        return {i: chunk.sums(t.square()) for i, t in enumerate(kept(chunk, stats))}

    def weights(blocks, stats):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        means = [(torch.tensor(sum((b[i] for b in blocks[1:]), blocks[0][i]).value(), dtype=acc) / n).to(dtype)
                 for i in range(meta.inputs)]
        return {"q": energy_weights(torch.stack(means))}

    def apply(chunk: Chunk, stats: dict) -> torch.Tensor:
        t = kept(chunk, stats)
        erase = consensus_masks(t)
        w = [qi.to(chunk.base.device) * e for qi, e in zip(stats["q"], erase)]
        merged = rounded_sum(v * wi for v, wi in zip(t, w))
        norm = rounded_sum(w).clamp(min=1e-6)
        return chunk.base + merged / norm

    passes: tuple[Pass, ...] = ()
    if selecting and n:
        sel = select.Selection("var", lambda chunk, stats: select.keys(variance(tvs(chunk)).abs(), True),
                               lambda stats: (stats["k"] - 1,), coarse=dtype == torch.bfloat16)
        passes = (Pass(nonzero, cut_rank), *select.passes([sel], when=lambda s: 0 < s["k"] < n))
    return Program(apply, passes + (Pass(energies, weights),))


def sce(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    *,
    select_topk: float = 1.0,
    int8_mask: bool = False,
) -> torch.Tensor:
    return run_whole(program, xs, base, {"select_topk": select_topk})


METHOD = Method(
    name="sce",
    kernel=sce,
    program=program,
    params=(
        Param("select_topk", float, default=1.0, low=0, high=1,
              doc="fraction of the nonzero-variance positions kept"),
        Param("int8_mask", bool, default=False, doc="memory saving in mergekit; no effect here"),
    ),
    base="required",
    min_inputs=0,
    rectify="base",
    doc="SCE: select by variance, calculate energy weights, erase sign conflicts. The top-k cut "
        "is exact; equal variances at the cut are kept lowest flat index first (deviation: "
        "mergekit keeps whichever torch.topk picks).",
)
