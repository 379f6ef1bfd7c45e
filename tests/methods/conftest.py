"""Shared helpers for the merge-kernel tests."""

from __future__ import annotations

import pytest


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
