"""Sparsifiers for task vectors: which entries of a delta survive, and the L1 rescale, as passes.

Used by the task-arithmetic family (METHODS.md, "Sparsifiers"). A `Prune` says how one
model's delta d = x - b is sparsified in one tensor; `selections` and `rescale_pass` are the
reduction passes it needs, `kept(prune, chunk, stats, d)` the chunk's surviving entries.
Kept entries are `d * mask` in d's dtype (a dropped negative entry becomes -0.0, as in
mergekit); `density >= 1` leaves d untouched.
- magnitude: the k = max(1, int(density * numel)) largest |d| (exact radix selection, ties
  at the cut by lower flat index; mergekit keeps at least one element too).
- magnitude_outliers: drop the int(gamma * numel) largest and the smallest, keeping
  int(density * numel): the ranks [top, top + keep) from the largest.
- random: keep each entry when its counter-based draw is < density (DARE).
- della_magprune: keep with a probability that grows with the entry's magnitude rank in its
  row, from density - epsilon to density + epsilon.
With `rescale`, the kept values are scaled by Σ|d| / Σ|kept| over the whole tensor (one more
pass), skipped when either sum < 1e-7; the sums are in d's dtype, as mergekit computes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergeflow.methods import select
from mergeflow.methods.passes import Chunk, Meta, Pass, Program, as_tensor, run_whole

RESCALE_EPS = 1e-7
SPARSIFIERS = ("magnitude", "random", "magnitude_outliers", "della_magprune")


@dataclass(frozen=True)
class Prune:
    """How model `index`'s delta is sparsified in one tensor of `numel` elements."""

    index: int
    kind: str | None  # a sparsifier, "zero" (nothing survives), or None (nothing pruned)
    density: float = 1.0
    rescale: bool = False
    window: tuple[int, int] = (0, 0)  # magnitude kinds: the kept ranks [lo, hi]
    epsilon: float = 0.15

    @property
    def tag(self) -> tuple:
        return ("sel", self.index)


def plan_prune(index: int, method: str | None, numel: int, *, density: float, rescale: bool,
               gamma: float | None = None, epsilon: float | None = None) -> Prune:
    """The Prune of one model (validates della's bounds)."""
    if method is None or density >= 1 or numel == 0:
        return Prune(index, None)
    if method not in SPARSIFIERS:
        raise ValueError(f"unknown sparsifier {method!r}; expected one of {', '.join(SPARSIFIERS)}")
    if method == "magnitude":
        k = max(1, int(density * numel)) if density > 0 else 0
        if k >= numel:
            return Prune(index, None)
        return Prune(index, "magnitude" if k else "zero", density, rescale, (0, k - 1))
    if method == "magnitude_outliers":
        keep, top = int(density * numel), int((0.01 if gamma is None else gamma) * numel)
        bottom = numel - keep - top
        if bottom < 0:
            top += bottom
        if not keep:
            return Prune(index, "zero", density, rescale)
        return Prune(index, "magnitude", density, rescale, (top, top + keep - 1))
    eps = 0.15 if epsilon is None else epsilon
    if method == "della_magprune":
        error = della_bounds_error(density, eps)
        if error:
            raise ValueError(error)
    return Prune(index, method, density, rescale, epsilon=eps)


def della_bounds_error(density: float, epsilon: float) -> str | None:
    """The DELLA rule: with density < 1, density ± epsilon must lie in (0, 1)."""
    if density >= 1 or (0 < density - epsilon and density + epsilon < 1):
        return None
    return (f"della: density - epsilon and density + epsilon must lie in (0, 1), "
            f"got density={density}, epsilon={epsilon}; lower epsilon or move density")


def delta(chunk: Chunk, i: int) -> torch.Tensor:
    return chunk.xs[i] - chunk.base


def selections(prunes: list[Prune], dtype: torch.dtype) -> list[select.Selection]:
    """The rank selections of the magnitude kinds: the cut at each end of their window."""
    out = []
    for p in prunes:
        if p.kind == "magnitude":
            lo, hi = p.window
            out.append(select.Selection(p.tag, lambda chunk, stats, i=p.index: select.keys(delta(chunk, i).abs(), True),
                                        (lo, hi) if lo else (hi,), coarse=dtype == torch.bfloat16))
    return out


def mask(p: Prune, chunk: Chunk, stats: dict, d: torch.Tensor) -> torch.Tensor | None:
    """Which of the chunk's entries of d survive (bool, d's shape); None: all of them. Kept in
    chunk.memo when there is one (the rescale pass makes it, the apply takes it)."""
    if p.kind is None:
        return None
    if chunk.memo is not None:
        if ("mask", p.index) not in chunk.memo:
            chunk.memo[("mask", p.index)] = _mask(p, chunk, stats, d)
        return chunk.memo[("mask", p.index)].to(d.device)
    return _mask(p, chunk, stats, d)


def _mask(p: Prune, chunk: Chunk, stats: dict, d: torch.Tensor) -> torch.Tensor:
    if p.kind == "zero":
        return torch.zeros(d.shape, dtype=torch.bool, device=d.device)
    if p.kind == "magnitude":
        cuts = stats[p.tag]
        upper, lower = (cuts[0], cuts[1]) if len(cuts) == 2 else (None, cuts[0])
        return select.window(d.abs(), chunk, p.tag, *p.window, upper, lower)
    draws = chunk.uniform(p.index).to(d.device)
    if p.kind == "random":
        return draws < p.density
    return draws < della_probabilities(d, p.density, p.epsilon)


def kept(p: Prune, chunk: Chunk, stats: dict, d: torch.Tensor) -> torch.Tensor:
    """d's surviving entries (d * mask in d's dtype), rescaled when the prune says so."""
    m = mask(p, chunk, stats, d)
    if m is None:
        return d
    out = d * m  # a bool factor: d or ±0, as d * mask in d's dtype
    scale = stats.get(("scale", p.index))
    return out * scale.to(out.device) if scale is not None else out


def rescale_pass(prunes: list[Prune], dtype: torch.dtype) -> tuple[Pass, ...]:
    """Σ|d| and Σ|kept| of every model that rescales; stats[("scale", i)] = the factor (or None)."""
    scaled = [p for p in prunes if p.rescale and p.kind is not None]
    if not scaled:
        return ()

    def sums(chunk: Chunk, stats: dict) -> dict:
        out = {}
        for p in scaled:
            d = delta(chunk, p.index)
            m = mask(p, chunk, stats, d)
            out[("before", p.index)] = chunk.sums(d.abs())
            out[("after", p.index)] = chunk.sums((d * m).abs())
        return out

    def factors(blocks: list[dict], stats: dict) -> dict:
        out = {}
        for p in scaled:
            before = sum((b[("before", p.index)] for b in blocks[1:]), blocks[0][("before", p.index)]).value()
            after = sum((b[("after", p.index)] for b in blocks[1:]), blocks[0][("after", p.index)]).value()
            out[("scale", p.index)] = rescale_factor(before, after, dtype)
        return out

    return (Pass(sums, factors),)


def rescale_factor(before: float, after: float, dtype: torch.dtype) -> torch.Tensor | None:
    """Σ|d| / Σ|kept| as a 0-d tensor of d's dtype (None: skipped, a sum < 1e-7). (Deviation:
    a sum that overflows the dtype, e.g. a large float16 tensor, is taken in float32 instead
    of turning the tensor into NaN.)"""
    b, a = as_tensor(before, dtype), as_tensor(after, dtype)
    if not bool(torch.isfinite(b)) or not bool(torch.isfinite(a)):
        b, a = as_tensor(before, torch.float32), as_tensor(after, torch.float32)
    if bool(b < RESCALE_EPS) or bool(a < RESCALE_EPS):
        return None
    return b / a


def della_probabilities(d: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep probability per entry: density - epsilon for the smallest |d| of its row, rising
    linearly with rank to density + epsilon for the largest. Rows run along dim 1 (a 0-D or
    1-D tensor is one row); a one-element row gets `density`."""
    rows = d.reshape(1, -1) if d.dim() < 2 else d
    n = rows.shape[1]
    if n < 2:
        return torch.full(d.shape, density, dtype=torch.float32, device=d.device)
    mags = rows.abs()
    if mags.dtype.itemsize in (2, 4, 8):  # magnitudes' bits order as they do (NaN last): faster
        mags = mags.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[mags.dtype.itemsize])
    order = torch.sort(mags, dim=1, stable=True).indices
    steps = torch.arange(n, device=d.device).view(1, n, *([1] * (rows.dim() - 2))).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, steps)  # 0 = smallest
    p = ranks.to(torch.float32) * (2 * epsilon / (n - 1)) + (density - epsilon)
    return p.reshape(d.shape)


def passes(prunes: list[Prune], dtype: torch.dtype) -> tuple[Pass, ...]:
    """Every pass the prunes need: the selections, then the rescale sums."""
    sel = selections(prunes, dtype)
    return (select.passes(sel) if sel else ()) + rescale_pass(prunes, dtype)


def sparsify(d: torch.Tensor, method: str, *, density: float, rescale: bool, gamma: float | None = None,
             epsilon: float | None = None, key: int | None = None) -> torch.Tensor:
    """One delta sparsified on its own (the whole tensor): what the family's kernel does to
    each model's delta. Random sparsifiers draw from stream `key`."""
    if method in ("random", "della_magprune") and key is None and density < 1:
        raise ValueError(f"the {method} sparsifier needs a random stream key")
    prune = plan_prune(0, method, d.numel(), density=density, rescale=rescale, gamma=gamma, epsilon=epsilon)

    def program(meta: Meta) -> Program:
        return Program(lambda chunk, stats: kept(prune, chunk, stats, delta(chunk, 0)),
                       passes([prune], meta.dtype), row_local=prune.kind == "della_magprune")

    return run_whole(program, [d], torch.zeros_like(d), {}, keys=(key or 0,))
