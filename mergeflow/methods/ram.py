"""ram and ramplus_tl: Reinforced Agent Merging on task vectors.

METHODS.md, "ram / ramplus_tl": an entry of a task vector is active when |T_i| > epsilon;
entries only one model changes are kept as they are (ramplus_tl scales them by a per-model
lambda), entries several models change are averaged over those models.
"""

from __future__ import annotations

import torch

from mergeflow.methods.base import Method, Param
from mergeflow.methods.linear import rounded_sum
from mergeflow.methods.passes import Chunk, Meta, Pass, Program, run_whole


def _active(tvs: list[torch.Tensor], epsilon: float):
    """(active masks a_i, unique = [c == 1], overlap = [c > 1], counts c clamped to >= 1)."""
    active = [t.abs() > epsilon for t in tvs]
    counts = torch.zeros(tvs[0].shape, dtype=torch.int64, device=tvs[0].device)
    for a in active:
        counts += a
    return active, counts == 1, counts > 1, counts.clamp(min=1)


def _ram_terms(chunk: Chunk, epsilon: float, lambdas=None) -> torch.Tensor:
    tvs = [x - chunk.base for x in chunk.xs]
    active, unique, overlap, counts = _active(tvs, epsilon)
    terms = []
    for i, (t, a) in enumerate(zip(tvs, active)):
        tz = t * a
        own = tz * unique if lambdas is None else tz * unique * lambdas[i]
        terms.append(own + tz * overlap / counts)
    return chunk.base + rounded_sum(terms)


def ram_program(meta: Meta) -> Program:
    """r = b + Σ_i (T_i a_i [c==1] + T_i a_i [c>1] / max(c, 1)): elementwise."""
    epsilon = meta.params["epsilon"]
    if not meta.inputs:
        return Program(lambda chunk, stats: chunk.base)
    return Program(lambda chunk, stats: _ram_terms(chunk, epsilon))


def ram(xs: list[torch.Tensor], base: torch.Tensor, *, epsilon: float = 1e-5) -> torch.Tensor:
    return run_whole(ram_program, xs, base, {"epsilon": epsilon})


def ramplus_program(meta: Meta) -> Program:
    """ram with each model's unique entries scaled by λ_i, from whole-tensor counts of its
    shared and unique entries (one reduction pass of exact integer counts). The λ-scaled sum
    runs in float32 (as in mergekit) and the result is rounded once to the compute dtype
    (deviation: mergekit returns float32 whatever the dtype)."""
    p = meta.params
    if not meta.inputs:
        return Program(lambda chunk, stats: chunk.base)

    def counts(chunk: Chunk, stats: dict) -> dict:
        active, unique, overlap, _ = _active([x - chunk.base for x in chunk.xs], p["epsilon"])
        return {("shared", i): int((a & overlap).sum()) for i, a in enumerate(active)} | \
               {("own", i): int((a & unique).sum()) for i, a in enumerate(active)}

    def finish(blocks: list[dict], stats: dict) -> dict:
        total = {k: sum(b.get(k, 0) for b in blocks) for k in blocks[0]}
        lambdas = []
        for i in range(meta.inputs):
            shared = torch.tensor([total[("shared", i)]])
            own = torch.tensor([total[("own", i)]])
            rho = shared / own.clamp(min=p["epsilon"])
            lambdas.append(1 + p["r"] * rho.clamp(min=0, max=p["alpha"]))
        return {"lambdas": lambdas}

    def apply(chunk: Chunk, stats: dict) -> torch.Tensor:
        lambdas = [lam.to(chunk.base.device) for lam in stats["lambdas"]]
        return _ram_terms(chunk, p["epsilon"], lambdas).to(chunk.base.dtype)

    return Program(apply, (Pass(counts, finish),))


def ramplus_tl(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    *,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
) -> torch.Tensor:
    return run_whole(ramplus_program, xs, base, {"r": r, "alpha": alpha, "epsilon": epsilon})


_EPSILON = Param("epsilon", float, default=1e-5, low=0, doc="|T| above this counts as a change")

METHODS: tuple[Method, ...] = (
    Method(
        name="ram",
        kernel=ram,
        program=ram_program,
        params=(_EPSILON,),
        base="required",
        min_inputs=0,
        rectify="base",
        doc="RAM: keep entries one model changes, average entries several models change.",
    ),
    Method(
        name="ramplus_tl",
        kernel=ramplus_tl,
        program=ramplus_program,
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
