"""Shared helpers for the merge-kernel tests."""

from __future__ import annotations

import pytest
import torch


def make_generators(seed: int, count: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed * 1000 + i) for i in range(count)]


@pytest.fixture
def gens():
    """gens(seed, count): `count` CPU generators derived from `seed`."""
    return make_generators


def call(method, xs, base=None, **params):
    """Call a registered method's kernel the way the engine does: presets plus defaults for
    every parameter not given (per-model defaults broadcast over xs)."""
    kwargs = dict(method.preset)
    for p in method.params:
        if p.name in params:
            kwargs[p.name] = params.pop(p.name)
        elif not p.required:
            kwargs[p.name] = [p.default] * len(xs) if p.per_model else p.default
    kwargs.update(params)
    return method.kernel(xs, base, **kwargs)


@pytest.fixture
def run():
    """run(method, xs, base=None, **params): call the kernel with defaults filled in."""
    return call
