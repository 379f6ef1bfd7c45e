"""Gradients, filters and precedence, with hand-computed values (METHODS.md, "Parameters")."""

from __future__ import annotations

import pytest

from mergeflow.methods import REGISTRY
from mergeflow.plan.params import MISSING, check_values, evaluate, gradient, resolve, resolve_all
from mergeflow.spec.config import Conditional

LINEAR = REGISTRY["linear"]
WEIGHT = LINEAR.param("weight")


@pytest.mark.parametrize(
    ("values", "t", "expected"),
    [
        ([0.0, 1.0], 0.0, 0.0),
        ([0.0, 1.0], 1.0, 1.0),
        ([0.0, 1.0], 0.25, 0.25),
        # s = 0.5 * 2 = 1 -> exactly v[1]
        ([0.0, 0.5, 1.0], 0.5, 0.5),
        # s = 0.75 * 2 = 1.5, i = 1, f = 0.5 -> 0.5*0.5 + 0.5*1.0 = 0.75
        ([0.0, 0.5, 1.0], 0.75, 0.75),
        # s = 1/3 * 3 = 1 -> v[1] = 0.2
        ([1.0, 0.2, 0.6, 0.0], 1 / 3, 0.2),
        # s = 0.5 * 3 = 1.5 -> 0.5*0.2 + 0.5*0.6 = 0.4
        ([1.0, 0.2, 0.6, 0.0], 0.5, 0.4),
        ([0.7], 0.3, 0.7),
    ],
)
def test_gradient_interpolates(values, t, expected):
    assert gradient(values, t) == pytest.approx(expected)


def test_bool_gradient_picks_not_interpolates():
    assert gradient([True, False], 0.4) is True
    assert gradient([True, False], 1.0) is False


def test_filters_first_match_wins_and_value_may_be_gradient():
    setting = [Conditional(filter="self_attn", value=[0.0, 1.0]), Conditional(filter="mlp", value=0.3),
               Conditional(value=0.9)]
    assert evaluate(setting, "model.layers.1.self_attn.q_proj.weight", 0.5) == pytest.approx(0.5)
    assert evaluate(setting, "model.layers.1.mlp.up_proj.weight", 0.5) == 0.3
    assert evaluate(setting, "model.norm.weight", 0.5) == 0.9


def test_unmatched_filter_falls_through_to_the_next_level():
    model_level = {"weight": [Conditional(filter="mlp", value=0.2)]}
    top_level = {"weight": 0.8}
    assert resolve(WEIGHT, [model_level, top_level], "model.layers.0.mlp.up_proj.weight", 0) == 0.2
    assert resolve(WEIGHT, [model_level, top_level], "model.layers.0.self_attn.q_proj.weight", 0) == 0.8
    assert resolve(WEIGHT, [model_level, None], "model.norm.weight", 0) is MISSING


def test_star_filter_matches_everything():
    assert evaluate([Conditional(filter="*", value=0.4)], "anything", 0) == 0.4


def test_precedence_and_defaults():
    values, missing = resolve_all(LINEAR, "model.norm.weight", 0.0,
                                  [{"weight": 2.0}, None], [{"weight": 1.0}, {"normalize": False}])
    assert values == {"weight": (2.0, 1.0), "normalize": False}
    assert missing == []
    values, missing = resolve_all(LINEAR, "x", 0.0, [None, {"weight": 1}], [None, None])
    assert values["normalize"] is True  # the method default
    assert missing == [("weight", 0)]


def test_resolved_values_are_range_checked():
    ties = REGISTRY.get("ties")
    if ties is None:
        pytest.skip("ties not registered")
    values, _ = resolve_all(ties, "x", 0.0, [{"weight": 1.0, "density": 0.0}], [None])
    assert any("density" in msg for msg in check_values(ties, values))
