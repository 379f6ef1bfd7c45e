"""Exact rank selection by radix histograms, in two passes over the data and no sort.

METHODS.md, "Top-k": the threshold is the exact k-th largest value. A value's *key* is its
float32 bit pattern made order-preserving as an int32 (negative floats reversed), so keys
compare as the values do. Pass 1 counts the keys' high 16 bits (65536 bins); for each wanted
rank the bin holding it is found by counting down from the top. Pass 2 counts the low 16 bits
of the keys in that bin, which gives the exact key. Keys of values that were bfloat16 have
low bits 0, so they need pass 1 only.

Ranks count from the largest (rank 0). Among elements equal to a cut value, lower flat index
ranks first (the index rule): `window` keeps the elements whose rank lies in [lo, hi], using
the number of equal elements before the chunk (`Cut.before` per row block, then a running
count in `chunk.carry`), so the same elements are kept at any chunking.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mergeflow.methods.passes import Chunk, Hist, Pass

BINS = 1 << 16
_FLIP = 0x7FFFFFFF


def keys(values: torch.Tensor, nonnegative: bool = False) -> torch.Tensor:
    """Order-preserving int32 keys of `values` (as float32), flattened; -0 and +0 share key 0.
    `nonnegative`: the values are magnitudes (no sign bit set), whose bits are their keys."""
    bits = values.reshape(-1).float().view(torch.int32)
    return bits if nonnegative else torch.where(bits < 0, (bits ^ _FLIP) + 1, bits)


def key_value(key: int) -> float:
    """The float32 value of a key."""
    bits = (key - 1) ^ _FLIP if key < 0 else key
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


def _high(k: torch.Tensor) -> torch.Tensor:
    return (k >> 16) + (BINS // 2)


@dataclass(frozen=True)
class Cut:
    """The element of one rank: its key, how many are greater, how many equal, and per row
    block how many equal elements lie in earlier blocks."""

    key: int
    above: int
    equal: int
    before: tuple[int, ...]

    @property
    def value(self) -> float:
        return key_value(self.key)


@dataclass(frozen=True)
class Selection:
    """Ranks (from the largest) wanted among the keys `key(chunk, stats)` of one tensor."""

    name: str
    key: Callable[[Chunk, dict], torch.Tensor]
    ranks: tuple[int, ...] | Callable[[dict], tuple[int, ...]]  # or from earlier statistics
    coarse: bool = False  # keys of bfloat16 values: constant low bits within a bin, one pass

    def wanted(self, stats: dict) -> tuple[int, ...]:
        return self.ranks(stats) if callable(self.ranks) else self.ranks


def _find(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """(bin, number of elements in higher bins) for the element of `rank` from the top."""
    above = torch.flip(counts, [0]).cumsum(0)  # above[j]: elements in the top j+1 bins
    j = int(torch.searchsorted(above, torch.tensor(rank, dtype=above.dtype), right=True))
    return BINS - 1 - j, int(above[j - 1]) if j else 0


def passes(selections: list[Selection], when: Callable[[dict], bool] | None = None) -> tuple[Pass, ...]:
    """The one or two passes that find every selection's cuts; stats[name] = tuple of Cuts
    (in the order of `ranks`). `when(stats)`: run only if true (else the cuts are not made)."""
    skip = (lambda stats: not when(stats)) if when else (lambda stats: False)

    def high(chunk: Chunk, stats: dict) -> dict:
        return {s.name: Hist(torch.bincount(_high(s.key(chunk, stats)), minlength=BINS)) for s in selections}

    def bins(blocks: list[dict], stats: dict) -> dict:
        out = {}
        for s in selections:
            total = sum((b[s.name].counts for b in blocks if s.name in b), torch.zeros(BINS, dtype=torch.int64))
            found = [_find(total, r) for r in s.wanted(stats)]
            out[("bins", s.name)] = found
            if s.coarse:
                out[s.name] = tuple(_coarse_cut(blocks, s, total, b, above) for b, above in found)
        return out

    fine = [s for s in selections if not s.coarse]

    def low(chunk: Chunk, stats: dict) -> dict:
        out = {}
        for s in fine:
            k = s.key(chunk, stats)
            hi = _high(k)
            for b in sorted({b for b, _ in stats[("bins", s.name)]}):
                inside = k[hi == b] & (BINS - 1)
                out[(s.name, b)] = Hist(torch.bincount(inside, minlength=BINS))
        return out

    def cuts(blocks: list[dict], stats: dict) -> dict:
        out = {}
        for s in fine:
            made = []
            for (b, above), rank in zip(stats[("bins", s.name)], s.wanted(stats)):
                parts = [blk.get((s.name, b), Hist(torch.zeros(BINS, dtype=torch.int64))).counts for blk in blocks]
                low_bin, above_low = _find(sum(parts), rank - above)
                key = ((b - BINS // 2) << 16) | low_bin
                counts = [int(p[low_bin]) for p in parts]
                made.append(Cut(key, above + above_low, sum(counts), _before(counts)))
            out[s.name] = tuple(made)
        return out

    first = Pass(high, bins, skip)
    return (first, Pass(low, cuts, skip)) if fine else (first,)


def _coarse_cut(blocks: list[dict], s: Selection, total: torch.Tensor, b: int, above: int) -> Cut:
    """A bin of bfloat16 keys holds one key (their low 16 bits are 0): the bin's."""
    key = (b - BINS // 2) << 16
    counts = [int(blk[s.name].counts[b]) if s.name in blk else 0 for blk in blocks]
    return Cut(key, above, int(total[b]), _before(counts))


def _before(counts: list[int]) -> tuple[int, ...]:
    out, seen = [], 0
    for c in counts:
        out.append(seen)
        seen += c
    return tuple(out)


def window(values: torch.Tensor, chunk: Chunk, tag: object, lo: int, hi: int, upper: Cut | None,
           lower: Cut) -> torch.Tensor:
    """Mask of the chunk's elements whose rank is in [lo, hi] (values compared as floats, as
    their keys order them): `upper` is the cut at rank lo (None when lo is 0), `lower` the cut
    at rank hi; `tag` names this selection in chunk.carry (running counts of equal elements
    over the block's chunks). Equal elements take the ranks after the greater ones in flat
    order, so only the chunk where a cut falls inside a run of equal elements needs their
    positions."""
    v = values.float() if values.dtype == torch.float64 else values  # float32 compares, as the keys
    if upper is None:  # the top hi + 1: everything above the cut and its first equal elements
        return _top(v, chunk, tag, hi, lower)
    keep = (v > lower.value) & (v < upper.value)
    for cut in {c.key: c for c in (upper, lower)}.values():
        seen = chunk.carry.get((tag, cut.key), cut.before[chunk.block])
        equal = v == cut.value
        n = int(equal.sum())
        first = cut.above + seen  # the rank of this chunk's first equal element
        a, b = max(lo, first), min(hi, first + n - 1)
        if n and a <= b:
            keep.view(-1)[equal.view(-1).nonzero().view(-1)[a - first: b - first + 1]] = True
        chunk.carry[(tag, cut.key)] = seen + n
    return keep


def _top(v: torch.Tensor, chunk: Chunk, tag: object, hi: int, cut: Cut) -> torch.Tensor:
    seen = chunk.carry.get((tag, cut.key), cut.before[chunk.block])
    need = hi - (cut.above + seen) + 1  # equal elements still kept, from this chunk on
    if need <= 0:
        return v > cut.value
    equal = v == cut.value
    n = int(equal.sum())
    chunk.carry[(tag, cut.key)] = seen + n
    if n <= need:
        return v >= cut.value
    keep = v > cut.value
    keep.view(-1)[equal.view(-1).nonzero().view(-1)[:need]] = True
    return keep
