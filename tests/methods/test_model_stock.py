"""model_stock: golden ratios, singular case, filter-wise rows, declaration."""

from __future__ import annotations

import pytest
import torch

from mergeflow.methods import REGISTRY
from mergeflow.methods.model_stock import model_stock

Z = torch.zeros(2)


def test_golden_two_models():
    # o0 = [1,0], o1 = [1,1]: c = 1/√2 = 0.7071068; t = 2c/(1+c) = 1.4142136/1.7071068 = 0.8284271
    # mean(x) = [1, 0.5] -> t·[1, 0.5] + (1-t)·0
    out = model_stock([torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])], Z)
    torch.testing.assert_close(out, torch.tensor([0.8284271, 0.4142136]))


def test_golden_three_models():
    # cosines: (o0,o1) = 0, (o0,o2) = (o1,o2) = 1/√2 -> c = 1.4142136/3 = 0.4714045
    # t = 3c/(1+2c) = 1.4142136/1.9428090 = 0.7279221; mean(x) = [2/3, 2/3] -> 0.4852814
    xs = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])]
    torch.testing.assert_close(model_stock(xs, Z), torch.tensor([0.4852814, 0.4852814]))


def test_orthogonal_task_vectors_keep_base():
    b = torch.tensor([1.0, 1.0])
    # task vectors e1, e2: c = 0 -> t = 0
    assert torch.equal(model_stock([torch.tensor([2.0, 1.0]), torch.tensor([1.0, 2.0])], b), b)


def test_singular_ratio_keeps_base():
    # c = -1: 1 + (2-1)(-1) = 0 -> t = 0 (as mergekit), not inf
    assert torch.equal(model_stock([torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])], Z), Z)


def test_identical_inputs_give_input_back():
    x = torch.tensor([3.0, -1.0])
    # c = 1 -> t = 2/2 = 1 -> mean(x) = x
    torch.testing.assert_close(model_stock([x, x.clone()], torch.tensor([1.0, 1.0])), x)


def test_filter_wise_rows_vs_whole_tensor():
    b = torch.zeros(2, 2)
    x0 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    x1 = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    # rows: row 0 as test_golden_two_models -> [0.8284271, 0.4142136]; row 1 orthogonal -> base
    out = model_stock([x0, x1], b, filter_wise=True)
    torch.testing.assert_close(out, torch.tensor([[0.8284271, 0.4142136], [0.0, 0.0]]))
    # whole: o0 = [1,0,1,0], o1 = [1,1,0,1]: c = 1/√6 = 0.4082483,
    # t = 2c/(1+c) = 0.8164966/1.4082483 = 0.5797959; mean = [[1, .5], [.5, .5]]
    out = model_stock([x0, x1], b)
    t = 0.5797959
    torch.testing.assert_close(out, torch.tensor([[t, t / 2], [t / 2, t / 2]]))


def test_filter_wise_one_dim_is_one_row():
    xs = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])]
    assert torch.equal(model_stock(xs, Z, filter_wise=True), model_stock(xs, Z))


def test_needs_two_others():
    with pytest.raises(ValueError, match="at least two"):
        model_stock([torch.ones(2)], Z)


def test_declaration():
    m = REGISTRY["model_stock"]
    assert (m.base, m.min_inputs, m.max_inputs, m.rectify) == ("required", 2, None, "common")
    assert m.param("filter_wise").default is False
