"""sce: golden values with and without top-k selection, declaration."""

from __future__ import annotations

import torch

from mergeflow.methods import REGISTRY
from mergeflow.methods.sce import sce

B = torch.zeros(4)
X0 = torch.tensor([1.0, 2.0, -1.0, 0.0])
X1 = torch.tensor([3.0, -2.0, 1.0, 0.0])


def test_golden_without_selection():
    # T0 = X0, T1 = X1; ΣT = [4, 0, 0, 0] -> majority + everywhere (0 counts +)
    # E0 = [T, T, F, F], E1 = [T, F, T, F]
    # q0 = (1+4+1+0)/4 = 1.5, q1 = (9+4+1+0)/4 = 3.5 -> normalised 0.3, 0.7
    # pos0: (1·0.3 + 3·0.7)/(0.3+0.7) = 2.4; pos1: 2·0.3/0.3 = 2; pos2: 1·0.7/0.7 = 1;
    # pos3: 0 / clamp(0, 1e-6) = 0
    torch.testing.assert_close(sce([X0, X1], B), torch.tensor([2.4, 2.0, 1.0, 0.0]))


def test_golden_with_topk():
    # population variance per position: (1,3) -> 1, (2,-2) -> 4, (-1,1) -> 1, (0,0) -> 0
    # nonzero 3, k = int(3·0.5) = 1 -> keep position 1 only: T0 = [0,2,0,0], T1 = [0,-2,0,0]
    # Σ = 0 -> +; E0 = [F,T,F,F]; q0 = q1 = 1 -> 0.5 each; pos1: 2·0.5/0.5 = 2
    torch.testing.assert_close(sce([X0, X1], B, select_topk=0.5), torch.tensor([0.0, 2.0, 0.0, 0.0]))


def test_topk_zero_keeps_base():
    b = torch.ones(4)
    assert torch.equal(sce([X0 + b, X1 + b], b, select_topk=0.0), b)


def test_identical_inputs_give_input_back():
    g = torch.Generator().manual_seed(0)
    b, x = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    torch.testing.assert_close(sce([x, x.clone()], b), x)


def test_no_other_models_returns_base():
    out = sce([], B)
    assert torch.equal(out, B) and out.data_ptr() == B.data_ptr()


def test_declaration():
    m = REGISTRY["sce"]
    assert (m.base, m.min_inputs, m.rectify) == ("required", 0, "base")
    assert m.param("select_topk").default == 1.0
    assert m.param("select_topk").check(1.5) is not None
    assert m.param("int8_mask").default is False


def test_topk_ties_keep_the_lowest_indices():
    # with only a few distinct values nearly every position ties at the cut: the kept positions
    # are the top k of |var| by a stable descending sort (lower flat index first), computed here
    # with torch directly; the task vectors are the xs themselves (a zero base)
    g = torch.Generator().manual_seed(5)
    xs = [torch.randint(-2, 3, (64, 64), generator=g).float() for _ in range(3)]
    var = torch.var(torch.stack(xs), dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * 0.5)
    expected = torch.zeros(var.numel(), dtype=torch.bool)
    expected[torch.argsort(-var.abs().reshape(-1), stable=True)[:k]] = True
    keep = expected.reshape(64, 64)
    # a position is kept iff some model's masked task vector survives there (or all were 0)
    out = sce(xs, torch.zeros(64, 64), select_topk=0.5)
    kept = [x * keep for x in xs]
    assert torch.equal(out, sce(kept, torch.zeros(64, 64)))
    for rows in (1, 5, 64):  # at any chunking
        from mergeflow.methods.passes import run_whole
        from mergeflow.methods.sce import program
        assert torch.equal(run_whole(program, xs, torch.zeros(64, 64), {"select_topk": 0.5},
                                     chunk_elements=rows * 64), out)
