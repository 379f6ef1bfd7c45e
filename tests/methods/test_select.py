"""Radix selection: the exact value of every rank, and the index rule for ties, at any chunking."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergeflow.methods import select
from mergeflow.methods.passes import Layout, Program, reduce_pass, run_whole

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def cuts(values: torch.Tensor, ranks: tuple[int, ...], rows: int | None = None) -> tuple:
    """The selection's cuts over `values` (1-D) read in chunks of `rows` elements."""
    sel = select.Selection("s", lambda chunk, stats: select.keys(chunk.xs[0]), ranks,
                           coarse=values.dtype == torch.bfloat16)
    program = Program(lambda chunk, stats: chunk.xs[0], select.passes([sel]))
    layout, stats = Layout(tuple(values.shape)), {}
    for k, p in enumerate(program.passes):
        part = reduce_pass(program, k, lambda a, b: ([values[a:b]], None), layout, stats, (0, layout.rows),
                           rows or layout.rows)
        stats |= p.finish([part], stats)
    return stats["s"]


@st.composite
def tie_heavy(draw):
    """Values with few distinct magnitudes, both signs, zeros and -0 (every cut in a tie)."""
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(1, 200))
    levels = draw(st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=16), min_size=1, max_size=6))
    picks = draw(st.lists(st.integers(0, len(levels) - 1), min_size=n, max_size=n))
    values = torch.tensor([levels[i] for i in picks], dtype=torch.float64).to(dtype)
    if draw(st.booleans()):
        values[: n // 3] = -0.0
    return values


@settings(max_examples=40, deadline=None)
@given(values=tie_heavy(), data=st.data())
def test_every_rank_is_the_sorts_value(values, data):
    n = values.numel()
    ranks = tuple(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=3)))
    rows = data.draw(st.integers(max(1, n // 8), n))
    ordered = torch.sort(values.float(), descending=True).values
    for rank, cut in zip(ranks, cuts(values, ranks, rows)):
        assert select.key_value(cut.key) == float(ordered[rank])
        assert cut.above == int((values.float() > ordered[rank]).sum())
        assert cut.equal == int((values.float() == ordered[rank]).sum())


@settings(max_examples=40, deadline=None)
@given(values=tie_heavy(), data=st.data())
def test_window_keeps_ranks_by_value_then_index(values, data):
    # the kept set is ranks [lo, hi] of a stable descending sort: ties by lower flat index
    n = values.numel()
    lo = data.draw(st.integers(0, n - 1))
    hi = data.draw(st.integers(lo, n - 1))
    rows = data.draw(st.integers(max(1, n // 8), n))
    found = cuts(values, (lo, hi) if lo else (hi,))
    upper, lower = (found[0], found[1]) if lo else (None, found[0])

    def program(meta):
        def apply(chunk, stats):
            return select.window(chunk.xs[0], chunk, "w", lo, hi, upper, lower)
        return Program(apply)

    kept = run_whole(program, [values], None, {}, chunk_elements=rows)
    expected = torch.zeros(n, dtype=torch.bool)
    expected[torch.argsort(-values.float(), stable=True)[lo : hi + 1]] = True
    assert torch.equal(kept, expected)


def test_keys_order_as_the_values():
    v = torch.tensor([-float("inf"), -2.0, -1e-30, -0.0, 0.0, 1e-30, 3.0, float("inf")])
    k = select.keys(v)
    assert torch.equal(k, torch.sort(k).values) and k[3] == k[4] == 0  # -0 and +0: one key
    assert [select.key_value(int(x)) for x in k] == [x + 0.0 for x in v.tolist()]  # -0 read back as +0


def test_cut_counts_blocks_before():
    # two blocks of [3, 3, 1] and [3, 1, 1]: the 2nd largest is 3 with 3 equal, 2 of them in block 0
    values = torch.tensor([3.0, 3.0, 1.0, 3.0, 1.0, 1.0])
    sel = select.Selection("s", lambda chunk, stats: select.keys(chunk.xs[0]), (1,))
    layout, stats = Layout((6,)), {}
    program = Program(lambda chunk, stats: chunk.xs[0], select.passes([sel]))
    for k, p in enumerate(program.passes):
        parts = [reduce_pass(program, k, lambda a, b: ([values[a:b]], None), layout, stats, r, 3, block=i)
                 for i, r in enumerate(((0, 3), (3, 6)))]
        stats |= p.finish(parts, stats)
    (cut,) = stats["s"]
    assert (select.key_value(cut.key), cut.above, cut.equal, cut.before) == (3.0, 0, 3, (0, 2))
