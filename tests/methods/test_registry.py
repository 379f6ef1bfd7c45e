"""The registry: every method of METHODS.md, consistent declarations."""

from __future__ import annotations

import importlib
import inspect

import pytest

from mergeflow.methods import REGISTRY, get_method

NAMES = {
    "linear", "slerp", "nuslerp", "multislerp", "karcher", "task_arithmetic", "ties",
    "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
    "sce", "ram", "ramplus_tl", "model_stock", "nearswap", "arcee_fusion", "passthrough",
}
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}
BASE_RECTIFY = {"task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                "breadcrumbs_ties", "della", "della_linear", "sce", "ram", "ramplus_tl"}
MODULES = ("arcee_fusion", "draws", "karcher", "linear", "model_stock", "multislerp", "nearswap",
           "nuslerp", "passes", "passthrough", "ram", "sce", "select", "slerp", "sparsify", "task_arithmetic")


def test_all_methods_registered():
    assert set(REGISTRY) == NAMES
    for name, m in REGISTRY.items():
        assert m.name == name and get_method(name) is m


@pytest.mark.parametrize("name", sorted(NAMES))
def test_declaration_is_consistent(name):
    m = REGISTRY[name]
    assert m.random == (name in RANDOM)
    assert m.rectify == ("base" if name in BASE_RECTIFY else "common")
    assert m.doc
    assert m.max_inputs is None or m.max_inputs >= m.min_inputs
    kernel_params = inspect.signature(m.kernel).parameters
    for p in m.params:
        assert p.type in (float, int, bool)
        assert p.name in kernel_params or any(k.kind is k.VAR_KEYWORD for k in kernel_params.values())
        if not p.required and p.default is not None:
            assert p.check(p.default) is None, f"{name}.{p.name} default fails its own bounds"
    if m.random:
        assert "keys" in kernel_params


@pytest.mark.parametrize("module", MODULES)
def test_modules_have_a_docstring(module):
    assert importlib.import_module(f"mergeflow.methods.{module}").__doc__
