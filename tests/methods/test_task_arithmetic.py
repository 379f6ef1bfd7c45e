"""The task-arithmetic kernel and its eight presets: golden values, consensus, declarations."""

from __future__ import annotations

import pytest
import torch

from mergeflow.methods import REGISTRY
from mergeflow.methods.task_arithmetic import consensus_masks

FAMILY = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
          "breadcrumbs_ties", "della", "della_linear")
B = torch.tensor([1.0, 1.0, 1.0, 1.0])
X0 = torch.tensor([2.0, 1.0, 0.0, 1.5])  # d0 = [1, 0, -1, 0.5]
X1 = torch.tensor([1.5, 3.0, 2.0, 0.0])  # d1 = [0.5, 2, 1, -1]


def gens(seed: int, n: int = 2) -> tuple[int, ...]:
    """Counter-based random stream keys, one per model."""
    return tuple(seed * 100 + i for i in range(n))


def test_task_arithmetic_golden(run):
    m = REGISTRY["task_arithmetic"]
    # b + 1*d0 + 0.5*d1 = [1+1+0.25, 1+0+1, 1-1+0.5, 1+0.5-0.5]
    assert torch.equal(run(m, [X0, X1], B, weight=[1.0, 0.5]), torch.tensor([2.25, 2.0, 0.5, 1.0]))
    # lambda 0.5: mixed [1.25, 1, -0.5, 0] / 2 -> [1.625, 1.5, 0.75, 1]
    out = run(m, [X0, X1], B, weight=[1.0, 0.5], **{"lambda": 0.5})
    assert torch.equal(out, torch.tensor([1.625, 1.5, 0.75, 1.0]))
    # normalize: mixed / 1.5 = [5/6, 2/3, -1/3, 0]
    out = run(m, [X0, X1], B, weight=[1.0, 0.5], normalize=True)
    torch.testing.assert_close(out, torch.tensor([1 + 5 / 6, 1 + 2 / 3, 1 - 1 / 3, 1.0]))


def test_ties_golden_without_pruning(run):
    # W0 = [1, 0, -1, 0.5], W1 = 0.5*d1 = [0.25, 1, 0.5, -0.5]; ΣW = [1.25, 1, -0.5, 0]
    # majority [+, +, -, +] (0 counts +); mask0 [T, F (zero), T, T], mask1 [T, T, F, F]
    # mixed [1.25, 1, -1, 0.5] / div [1.5, 0.5, 1, 1] = [5/6, 2, -1, 0.5]
    out = run(REGISTRY["ties"], [X0, X1], B, weight=[1.0, 0.5])
    torch.testing.assert_close(out, torch.tensor([1 + 5 / 6, 3.0, 0.0, 1.5]))


def test_ties_golden_with_magnitude_pruning(run):
    # density 0.5 keeps 2 of 4: d0 -> [1, 0, -1, 0]; d1 -> [0, 2, 1, 0] (tie |1| = |-1|: torch's sort, as mergekit, puts position 2 first)
    # W0 = [1, 0, -1, 0], W1 = [0, 1, 0.5, 0]; ΣW = [1, 1, -0.5, 0] -> majority [+, +, -, +]
    # mixed [1, 1, -1, 0], div [1, 0.5, 1, 0 -> 1] -> [1, 2, -1, 0]
    out = run(REGISTRY["ties"], [X0, X1], B, weight=[1.0, 0.5], density=[0.5, 0.5])
    assert torch.equal(out, torch.tensor([2.0, 3.0, 0.0, 1.0]))


def test_negative_weight_flips_the_vote(run):
    b, x = torch.zeros(1), torch.ones(1)
    # W = [1*1, -2*1] -> Σ = -1: the second model's (negative) side wins; no normalize: b - 2
    out = run(REGISTRY["ties"], [x, x], b, weight=[1.0, -2.0], normalize=False)
    assert torch.equal(out, torch.tensor([-2.0]))


def test_consensus_masks_zero_rules():
    # Σ = [0, 0] counts as +; an exact zero term never agrees
    masks = consensus_masks([torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])])
    assert [m.tolist() for m in masks] == [[True, False], [False, False]]


def test_ties_where_no_model_agrees_divides_by_one(run):
    # both deltas pruned or zero at position 0: Σ w_i mask_i = 0 becomes 1, so the base stays
    b = torch.tensor([1.0, 1.0])
    x0, x1 = torch.tensor([1.0, 3.0]), torch.tensor([1.0, 2.0])
    out = run(REGISTRY["ties"], [x0, x1], b, weight=[0.5, 0.5])
    # position 1: deltas 2 and 1 agree, (0.5*2 + 0.5*1) / (0.5 + 0.5) = 1.5
    assert torch.equal(out, torch.tensor([1.0, 2.5]))


def test_bf16_weight_rounding_is_visible():
    m = REGISTRY["task_arithmetic"]
    b, x = torch.zeros(1, dtype=torch.bfloat16), torch.ones(1, dtype=torch.bfloat16)
    out = m.kernel([x], b, weight=[0.3], **m.preset)
    assert out.dtype == torch.bfloat16 and out.item() == 0.30078125  # 0.3 in bf16


def test_sum_over_models_rounds_once():
    m = REGISTRY["task_arithmetic"]
    b = torch.zeros(1, dtype=torch.bfloat16)
    xs = [torch.tensor([v], dtype=torch.bfloat16) for v in (256.0, 1.0, 1.0)]
    # float32 accumulation: 256 + 1 + 1 = 258 (a bf16 value). In-place bf16 would give
    # 256 + 1 = 257 -> 256 (round to even), + 1 -> 256.
    assert m.kernel(xs, b, weight=[1.0, 1.0, 1.0], **m.preset).item() == 258.0


@pytest.mark.parametrize("name", FAMILY)
def test_identical_inputs_give_the_base_back(run, name):
    m = REGISTRY[name]
    b = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    extra = {"keys": gens(0)} if m.random else {}
    out = run(m, [b.clone(), b.clone()], b, weight=[0.6, 0.4], density=[0.5, 0.5], **extra)
    assert torch.equal(out, b)


@pytest.mark.parametrize("name", FAMILY)
def test_no_other_models_returns_base(name):
    m = REGISTRY[name]
    assert torch.equal(m.kernel([], B, weight=[], **m.preset), B)


@pytest.mark.parametrize(("random_name", "plain_name"), [("dare_ties", "ties"), ("dare_linear", "task_arithmetic")])
def test_dare_with_density_one_prunes_nothing(run, random_name, plain_name):
    common = {"weight": [1.0, 0.5], "normalize": False, "rescale": True}
    out = run(REGISTRY[random_name], [X0, X1], B, keys=gens(1), **common)
    assert torch.equal(out, run(REGISTRY[plain_name], [X0, X1], B, **common))


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_presets_reproducible(run, name):
    m = REGISTRY[name]
    g = torch.Generator().manual_seed(9)
    b = torch.randn(64, 64, generator=g)
    xs = [b + torch.randn(64, 64, generator=g) for _ in range(2)]
    args = {"weight": [0.5, 0.5], "density": [0.5, 0.5]}
    a = run(m, xs, b, keys=gens(1), **args)
    assert torch.equal(a, run(m, xs, b, keys=gens(1), **args))
    assert not torch.equal(a, run(m, xs, b, keys=gens(2), **args))


def test_dare_linear_keeps_l1_of_single_task_vector(run):
    b = torch.zeros(200_000)
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(3))
    out = run(REGISTRY["dare_linear"], [x], b, weight=[1.0], density=[0.2], keys=gens(0, 1))
    assert abs(float((out != 0).float().mean()) - 0.2) < 0.01
    torch.testing.assert_close(out.abs().sum(), x.abs().sum(), rtol=1e-5, atol=0)


def test_breadcrumbs_uses_gamma(run):
    b = torch.zeros(10)
    x = torch.arange(1.0, 11.0)
    # keep int(0.5*10)=5, drop top int(0.1*10)=1 -> 5..9
    out = run(REGISTRY["breadcrumbs"], [x], b, weight=[1.0], density=[0.5], gamma=[0.1])
    assert out.tolist() == [0, 0, 0, 0, 5, 6, 7, 8, 9, 0]


def test_della_kernel_rejects_bad_epsilon(run):
    with pytest.raises(ValueError, match="epsilon"):
        run(REGISTRY["della"], [X0], B, weight=[1.0], density=[0.1], epsilon=[0.15], keys=gens(0, 1))


def test_presets_table():
    # METHODS.md: name -> (consensus, sparsifier, normalize, rescale)
    table = {
        "task_arithmetic": (False, None, False, False),
        "ties": (True, "magnitude", True, False),
        "dare_ties": (True, "random", False, True),
        "dare_linear": (False, "random", False, True),
        "breadcrumbs": (False, "magnitude_outliers", False, False),
        "breadcrumbs_ties": (True, "magnitude_outliers", False, False),
        "della": (True, "della_magprune", True, True),
        "della_linear": (False, "della_magprune", False, True),
    }
    for name, (consensus, sparsifier, normalize, rescale) in table.items():
        m = REGISTRY[name]
        assert m.preset == {"consensus": consensus, "sparsifier": sparsifier}
        assert (m.param("normalize").default, m.param("rescale").default) == (normalize, rescale)
        assert m.random == (sparsifier in ("random", "della_magprune"))
        assert (m.base, m.rectify) == ("required", "base")
        assert m.param("weight").required and m.param("weight").per_model
        assert m.param("density").per_model and m.param("density").default == 1.0
        assert not m.param("lambda").per_model and m.param("lambda").default == 1.0
        assert (m.param("gamma") is not None) == (sparsifier == "magnitude_outliers")
        assert (m.param("epsilon") is not None) == (sparsifier == "della_magprune")


def test_declaration_errors():
    ties = REGISTRY["ties"]
    assert "density must be > 0" in ties.param("density").check(0)
    assert ties.param("density").check(1.5) is not None
    assert ties.param("density").check(0.5) is None
    della = REGISTRY["della"]
    assert "epsilon" in della.check({"weight": 1.0, "density": 0.1, "epsilon": 0.15})
    assert della.check({"weight": 1.0, "density": 0.5, "epsilon": 0.15}) is None
    assert della.check({"weight": 1.0, "density": 1.0, "epsilon": 0.15}) is None  # defaults
    assert REGISTRY["breadcrumbs"].param("gamma").check(-0.1) is not None
