"""arcee_fusion: outlier threshold golden values, exact quartiles at any size and chunking, declaration."""

from __future__ import annotations

import torch

from mergeflow.methods import REGISTRY
from mergeflow.methods.arcee_fusion import arcee_fusion, program
from mergeflow.methods.passes import run_whole

V = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 20.0])


def test_golden_keeps_only_the_outlier():
    # one row: importance I = k·|x - a| with k = KL(softmax(x) ‖ uniform) > 0
    # quantiles of I: q1 = 2k, median = 4k, q3 = 6k -> threshold 4k + 1.5·4k = 10k
    # only |x - a| = 20 reaches it
    out = arcee_fusion([V], torch.zeros(8))
    assert torch.equal(out, torch.tensor([0.0] * 7 + [20.0]))


def test_golden_with_nonzero_base():
    # softmax is shift invariant, so x = 1 + V against a = 1 behaves as above
    a = torch.ones(8)
    assert torch.equal(arcee_fusion([a + V], a), torch.tensor([1.0] * 7 + [21.0]))


def test_identical_inputs_give_input_back():
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(arcee_fusion([x.clone()], x), x)


def test_compute_dtype_kept():
    out = arcee_fusion([V.bfloat16()], torch.zeros(8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16  # deviation: mergekit returns float32


def test_large_tensor_quantiles_are_exact():
    # 1,001,000 entries (mergekit samples 1e6 of them): the threshold is from the exact quartiles,
    # sorted[floor(q (n-1))] of the importance, computed here with torch.sort
    from mergeflow.methods.arcee_fusion import importance

    g = torch.Generator().manual_seed(0)
    a = torch.randn(1000, 1001, generator=g)
    x = a + torch.randn(1000, 1001, generator=g)
    scores = importance(x, a)
    ordered = torch.sort(scores.reshape(-1)).values
    n = ordered.numel()
    q1, med, q3 = (ordered[int(q * (n - 1))] for q in (0.25, 0.5, 0.75))
    expected = a + (x - a) * (scores >= med + 1.5 * (q3 - q1))
    out = arcee_fusion([x], a)
    assert torch.equal(out, expected)
    assert torch.equal(run_whole(program, [x], a, {}, chunk_elements=7 * 1001), out)  # any chunking


def test_declaration():
    m = REGISTRY["arcee_fusion"]
    assert (m.base, m.min_inputs, m.max_inputs, m.random, m.params) == ("required", 1, 1, False, ())
