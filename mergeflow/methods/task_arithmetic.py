"""The task-arithmetic family: one kernel on task vectors, eight presets as data.

task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della and
della_linear differ only in sign consensus, sparsifier and the defaults of `normalize` and
`rescale` (METHODS.md, "Task-arithmetic family"). The fixed choices reach the kernel
through `Method.preset`.
"""

from __future__ import annotations

import math

import torch

from mergeflow.methods import sparsify as sp
from mergeflow.methods.base import Method, Param
from mergeflow.methods.linear import rounded_sum
from mergeflow.methods.passes import Chunk, Meta, Program, run_whole


def consensus_masks(terms: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per term, 1 where its sign agrees with the sign of the rounded Σ terms (0 counts as +),
    else 0, in the terms' dtype (so applying a mask is a same-dtype multiply).

    Exact zeros (and NaNs) never agree. Only arithmetic, no boolean tensors: each step is
    one vectorised pass. (A non-finite Σ makes the merged value non-finite either way, and
    the merge stops on it.)
    """
    majority = rounded_sum(terms).sign_().add_(0.5).sign_()  # +1, or -1 where Σ < 0
    return [(term.sign() * majority).clamp_(min=0) for term in terms]


def _mix(terms: list[torch.Tensor], weights: list[torch.Tensor], consensus: bool, normalize: bool):
    """(Σ W_i [mask_i], Σ w_i [mask_i]) with the divisor's zeros (or |div| < 1e-8) set to 1;
    the divisor is None without `normalize`."""
    if consensus:
        masks = consensus_masks(terms)
        mixed = rounded_sum([t * m for t, m in zip(terms, masks)])
        if not normalize:
            return mixed, None
        div = rounded_sum([w * m for w, m in zip(weights, masks)])
        return mixed, div.sign().abs_().neg_().add_(1).add_(div)  # + 1 exactly where div == 0
    mixed = rounded_sum(terms)
    if not normalize:
        return mixed, None
    div = torch.stack(weights).sum()
    return mixed, torch.where(div.abs() < 1e-8, torch.ones_like(div), div)


def _prunes(meta: Meta) -> list[sp.Prune]:
    p, n = meta.params, math.prod(meta.shape)
    sparsifier = p.get("sparsifier")
    density, gamma, epsilon = p.get("density"), p.get("gamma"), p.get("epsilon")
    return [sp.plan_prune(i, sparsifier, n, density=1.0 if density is None else density[i],
                          rescale=bool(p.get("rescale")), gamma=None if gamma is None else gamma[i],
                          epsilon=None if epsilon is None else epsilon[i]) for i in range(meta.inputs)]


def program(meta: Meta) -> Program:
    """r = b + lambda * mix(w_i * sparsify(x_i - b)) (METHODS.md, "Task-arithmetic family"):
    the sparsifiers' passes (selections, rescale sums), then an elementwise apply."""
    p = meta.params
    lam, consensus, normalize = p.get("lambda", 1.0), bool(p.get("consensus")), bool(p.get("normalize"))
    if not meta.inputs:
        return Program(lambda chunk, stats: chunk.base)
    prunes = _prunes(meta)

    def apply(chunk: Chunk, stats: dict) -> torch.Tensor:
        base = chunk.base
        deltas = [sp.kept(q, chunk, stats, sp.delta(chunk, q.index)) for q in prunes]
        weights = [torch.tensor(w, dtype=base.dtype, device=base.device) for w in p["weight"]]
        terms = [d * w for d, w in zip(deltas, weights)]
        del deltas
        mixed, div = _mix(terms, weights, consensus, normalize)
        if div is not None:
            mixed = mixed / div
        if lam != 1:
            mixed = mixed * lam
        return (base + mixed).to(base.dtype)

    return Program(apply, sp.passes(prunes, meta.dtype),
                   row_local=any(q.kind == "della_magprune" for q in prunes))


def task_arithmetic(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: list[float],
    density: list[float] | None = None,
    normalize: bool = False,
    rescale: bool = False,
    int8_mask: bool = False,
    consensus: bool = False,
    sparsifier: str | None = None,
    gamma: list[float] | None = None,
    epsilon: list[float] | None = None,
    keys: tuple[int, ...] = (),
    **scalars: float,
) -> torch.Tensor:
    """The family's kernel on whole tensors; `lambda` arrives in `scalars` (a Python keyword).
    `int8_mask` only saves memory in mergekit and is ignored here."""
    lam = scalars.pop("lambda", 1.0)
    if scalars:
        raise TypeError(f"task_arithmetic got unexpected parameters: {', '.join(sorted(scalars))}")
    if sparsifier in ("random", "della_magprune") and len(keys) < len(xs):
        raise ValueError(f"the {sparsifier} sparsifier needs a random stream key per model")
    params = {"weight": weight, "density": density, "normalize": normalize, "rescale": rescale,
              "consensus": consensus, "sparsifier": sparsifier, "gamma": gamma, "epsilon": epsilon,
              "lambda": lam}
    return run_whole(program, xs, base, params, keys=keys)


def _della_check(values: dict[str, object]) -> str | None:
    return sp.della_bounds_error(float(values.get("density", 1.0)), float(values.get("epsilon", 0.15)))


def _params(sparsifier: str | None, normalize: bool, rescale: bool) -> tuple[Param, ...]:
    params = [
        Param("weight", float, required=True, per_model=True, doc="scale of the model's task vector"),
        Param("density", float, default=1.0, per_model=True, low=0, low_open=True, high=1,
              doc="fraction of the task vector kept by the sparsifier"),
        Param("lambda", float, default=1.0, doc="scale of the merged task vector"),
        Param("normalize", bool, default=normalize, doc="divide by the sum of the (agreeing) weights"),
        Param("rescale", bool, default=rescale, doc="rescale kept values to the task vector's L1 norm"),
        Param("int8_mask", bool, default=False, doc="memory saving in mergekit; no effect here"),
    ]
    if sparsifier == "magnitude_outliers":
        params.append(Param("gamma", float, default=0.01, per_model=True, low=0, high=1,
                            doc="fraction of the largest-magnitude entries dropped"))
    if sparsifier == "della_magprune":
        params.append(Param("epsilon", float, default=0.15, per_model=True, low=0,
                            doc="half-width of the keep-probability range around density"))
    return tuple(params)


# name, sign consensus, sparsifier, default normalize, default rescale, doc
PRESETS: tuple[tuple[str, bool, str | None, bool, bool, str], ...] = (
    ("task_arithmetic", False, None, False, False, "Add weighted task vectors to the base."),
    ("ties", True, "magnitude", True, False,
     "TIES: keep the largest-magnitude entries, elect a sign, average the agreeing ones "
     "(at least one entry per delta, as mergekit)."),
    ("dare_ties", True, "random", False, True, "DARE with TIES sign consensus."),
    ("dare_linear", False, "random", False, True, "DARE: random drop and L1 rescale."),
    ("breadcrumbs", False, "magnitude_outliers", False, False,
     "Model Breadcrumbs: drop the smallest entries and the largest outliers. "
     "Deviation: gamma giving 0 outliers keeps the upper end instead of zeroing the delta."),
    ("breadcrumbs_ties", True, "magnitude_outliers", False, False,
     "Model Breadcrumbs with TIES sign consensus (same gamma deviation as breadcrumbs)."),
    ("della", True, "della_magprune", True, True,
     "DELLA: magnitude-ranked random drop, TIES sign consensus. A one-element row keeps with "
     "probability density (deviation: mergekit's 0/0 rank gives NaN)."),
    ("della_linear", False, "della_magprune", False, True,
     "DELLA without sign consensus (same one-element-row rule as della)."),
)

_RANDOM_DOC = (" Randomness: counter-based draws per (tensor, model, element), so results are "
               "reproducible at any chunking but not bit-identical to mergekit's global RNG (deviation).")
_MAGNITUDE_DOC = (" The cut is the exact k-th largest |delta| (radix selection); equal magnitudes at "
                  "the cut are kept lowest flat index first (deviation: mergekit keeps whichever its "
                  "sort puts first).")
_RESCALE_DOC = (" With rescale, an L1 sum that overflows the dtype (float16) is redone in float32 "
                "instead of giving NaN (deviation).")


def _method(name: str, consensus: bool, sparsifier: str | None, normalize: bool, rescale: bool,
            doc: str) -> Method:
    random = sparsifier in ("random", "della_magprune")
    return Method(
        name=name,
        kernel=task_arithmetic,
        program=program,
        params=_params(sparsifier, normalize, rescale),
        base="required",
        min_inputs=0,
        rectify="base",
        random=random,
        check=_della_check if sparsifier == "della_magprune" else None,
        doc=doc + (_RANDOM_DOC if random else "")
        + (_MAGNITUDE_DOC if sparsifier in ("magnitude", "magnitude_outliers") else "")
        + (_RESCALE_DOC if sparsifier else ""),
        preset={"consensus": consensus, "sparsifier": sparsifier},
    )


METHODS: tuple[Method, ...] = tuple(_method(*row) for row in PRESETS)
