"""Sparsifiers for task vectors: which entries of a delta survive, and the L1 rescale.

Used by the task-arithmetic family (METHODS.md, "Sparsifiers"). Each sparsifier takes one
delta `d` and returns a tensor of the same shape and dtype; `density >= 1` returns `d`
untouched. Kept entries are `d * mask` (so a dropped negative entry becomes -0.0, as in
mergekit). Random sparsifiers draw on a CPU `torch.Generator` and move only the result to
`d`'s device, so the kept positions are the same bytes on any device.
"""

from __future__ import annotations

import torch

RESCALE_EPS = 1e-7
SPARSIFIERS = ("magnitude", "random", "magnitude_outliers", "della_magprune")


def rescale_l1(d: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Scale `kept` by Σ|d| / Σ|kept| over the whole tensor; skipped when either sum < 1e-7.

    The sums and their ratio are in `d`'s dtype, as mergekit computes them. (Deviation: a
    sum that overflows the dtype, e.g. a large float16 tensor, is redone in float32 instead
    of turning the tensor into NaN.)
    """
    before, after = d.abs().sum(), kept.abs().sum()
    if not bool(torch.isfinite(before)) or not bool(torch.isfinite(after)):
        before, after = d.abs().float().sum(), kept.abs().float().sum()
    if bool(before < RESCALE_EPS) or bool(after < RESCALE_EPS):
        return kept
    return kept * (before / after)


def apply_mask(d: torch.Tensor, keep: torch.Tensor, rescale: bool) -> torch.Tensor:
    """`d` with the entries where `keep` is False zeroed (then L1-rescaled if asked)."""
    kept = d * keep.to(device=d.device, dtype=d.dtype)
    return rescale_l1(d, kept) if rescale else kept


def _flat_mask(d: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    keep = torch.zeros(d.numel(), dtype=torch.bool, device=d.device)
    keep[positions] = True
    return keep.reshape(d.shape)


def magnitude_order(d: torch.Tensor, *, descending: bool) -> torch.Tensor:
    """Flat indices of `d` sorted by |d|, exactly as mergekit 0.1.5 orders them: torch's
    default (not stable) sort of |d|, taken in float32 on the CPU. Equal magnitudes stay in
    the order that sort leaves them: deterministic for a given torch build and device, but
    not necessarily lower index first.

    On the CPU the sort runs on the float32 bit patterns read as int32 instead: for values
    >= 0 they compare exactly as the floats do, torch's CPU sort is the same comparison sort
    for both dtypes, so the permutation is the same, ties included (tests/methods/
    test_sparsify.py checks it against the float sort), and integer compares make the sort
    a third to 40% faster (benchmarks/bench_kernels.py). Ascending order is the descending
    sort of the negated keys (the same comparisons, and clear of the radix sort torch may use
    for ascending integers). NaN magnitudes take the float sort.
    """
    w = d.abs().reshape(-1)
    if w.device.type != "cpu":
        return torch.argsort(w, descending=descending)
    w = w.float()
    if bool(torch.isnan(w).any()):
        return torch.argsort(w, descending=descending)
    keys = w.view(torch.int32)
    return torch.argsort(keys if descending else -keys, descending=True)


def magnitude(d: torch.Tensor, density: float, *, rescale: bool = False) -> torch.Tensor:
    """Keep the k = int(density * numel) largest |d| (ties: see `magnitude_order`).

    (Deviation: k = 0 keeps none; mergekit 0.1.5 keeps max(1, k).)"""
    if density >= 1:
        return d
    k = int(density * d.numel())
    order = magnitude_order(d, descending=True)
    return apply_mask(d, _flat_mask(d, order[:k]), rescale)


def random(
    d: torch.Tensor, density: float, *, generator: torch.Generator, rescale: bool = False
) -> torch.Tensor:
    """Keep each entry independently with probability `density` (DARE)."""
    if density >= 1:
        return d
    keep = torch.rand(d.shape, generator=generator) < density
    return apply_mask(d, keep, rescale)


def magnitude_outliers(
    d: torch.Tensor, density: float, *, gamma: float, rescale: bool = False
) -> torch.Tensor:
    """Drop the `gamma` fraction of largest |d| and the smallest, keeping int(density * numel).

    When keep + top exceed numel, the top cut shrinks; top = 0 keeps the upper end (as
    mergekit 0.1.5; older mergekit zeroed the whole delta). Ties: see `magnitude_order`.
    """
    if density >= 1:
        return d
    n = d.numel()
    keep = int(density * n)
    top = int(gamma * n)
    bottom = n - keep - top
    if bottom < 0:
        top, bottom = top + bottom, 0
    order = magnitude_order(d, descending=False)
    return apply_mask(d, _flat_mask(d, order[bottom : n - top]), rescale)


def della_bounds_error(density: float, epsilon: float) -> str | None:
    """The DELLA rule: with density < 1, density ± epsilon must lie in (0, 1)."""
    if density >= 1 or (0 < density - epsilon and density + epsilon < 1):
        return None
    return (f"della: density - epsilon and density + epsilon must lie in (0, 1), "
            f"got density={density}, epsilon={epsilon}; lower epsilon or move density")


def della_probabilities(d: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep probability per entry: density - epsilon for the smallest |d| of its row, rising
    linearly with rank to density + epsilon for the largest. Rows run along dim 1 (a 0-D or
    1-D tensor is one row); a one-element row gets `density`."""
    rows = d.reshape(1, -1) if d.dim() < 2 else d
    n = rows.shape[1]
    if n < 2:
        return torch.full(rows.shape, density, dtype=torch.float32, device=d.device)
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    steps = torch.arange(n, device=d.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, steps)  # 0 = smallest
    return ranks.to(torch.float32) * (2 * epsilon / (n - 1)) + (density - epsilon)


def della_magprune(
    d: torch.Tensor,
    density: float,
    *,
    epsilon: float,
    generator: torch.Generator,
    rescale: bool = False,
) -> torch.Tensor:
    """DELLA MagPrune: keep each entry with a probability that grows with its magnitude rank."""
    if density >= 1:
        return d
    error = della_bounds_error(density, epsilon)
    if error:
        raise ValueError(error)
    p = della_probabilities(d, density, epsilon)
    draws = torch.rand(p.shape, generator=generator).to(p.device)
    return apply_mask(d, (draws < p).reshape(d.shape), rescale)


def sparsify(
    d: torch.Tensor,
    method: str,
    *,
    density: float,
    rescale: bool,
    gamma: float | None = None,
    epsilon: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Dispatch to the sparsifier named `method` (one of SPARSIFIERS)."""
    if method in ("random", "della_magprune") and generator is None and density < 1:
        raise ValueError(f"the {method} sparsifier needs a random generator")
    if method == "magnitude":
        return magnitude(d, density, rescale=rescale)
    if method == "random":
        return random(d, density, generator=generator, rescale=rescale)
    if method == "magnitude_outliers":
        return magnitude_outliers(d, density, gamma=0.01 if gamma is None else gamma, rescale=rescale)
    if method == "della_magprune":
        eps = 0.15 if epsilon is None else epsilon
        return della_magprune(d, density, epsilon=eps, generator=generator, rescale=rescale)
    raise ValueError(f"unknown sparsifier {method!r}; expected one of {', '.join(SPARSIFIERS)}")
