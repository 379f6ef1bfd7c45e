"""mergekit-yaml with the index rule for ties at a top-k cut (METHODS.md, "Top-k"), for parity.

    /work/mkvenv/bin/python benchmarks/mergekit_index_ties.py CONFIG OUT [mergekit-yaml options]
    /work/mkvenv/bin/python benchmarks/mergekit_index_ties.py --multi CONFIG [mergekit-multi options]

mergekit 0.1.5 keeps whichever of the elements equal to a top-k threshold its (unstable) sort
or torch.topk puts first; mergeflow keeps those with the lowest flat index. This runs
mergekit's own merge with its three top-k orderings made to follow that rule, and nothing
else changed: magnitude's descending argsort and sce's topk become a stable descending sort;
magnitude_outliers' ascending sort becomes the reverse of it (its kept window counts from the
largest). `benchmarks/parity_mergekit.py` compares mergeflow with this too, so every
difference left from plain mergekit is shown to be a tie at the cut.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import torch


class _Torch:
    """The torch module as seen by one mergekit module, with some functions replaced."""

    def __init__(self, **replaced):
        self._replaced = replaced

    def __getattr__(self, name):
        return self._replaced.get(name) or getattr(torch, name)


def _descending(values: torch.Tensor) -> torch.Tensor:
    return torch.argsort(values, descending=True, stable=True)


def _argsort(values, dim=-1, descending=False, **_):
    if values.dim() == 1 and descending:
        return _descending(values)
    return torch.argsort(values, dim=dim, descending=descending, stable=True)


def _sort(values, dim=-1, descending=False, **_):
    if values.dim() == 1 and not descending:  # ascending with equal values in reverse index order
        order = _descending(values).flip(0)
        return SimpleNamespace(values=values[order], indices=order)
    return torch.sort(values, dim=dim, descending=descending, stable=True)


def _topk(values, k, largest=True, **_):
    order = _descending(values if largest else -values)[:k]
    return SimpleNamespace(values=values[order], indices=order)


def _pair(result: SimpleNamespace) -> tuple:
    return result.values, result.indices


def main() -> int:
    import mergekit.merge_methods.sce as sce
    import mergekit.sparsify as sparsify
    from mergekit.scripts.run_yaml import main as run_yaml

    sparsify.torch = _Torch(argsort=_argsort, sort=_sort)
    sce.torch = _Torch(topk=lambda values, k, largest=True, **kw: _pair(_topk(values, k, largest)))
    if sys.argv[1:2] == ["--multi"]:  # mergekit-multi (benchmarks/parity_multi.py)
        from mergekit.scripts.multimerge import main as run_multi

        del sys.argv[1]
        sys.argv[0] = "mergekit-multi"
        return run_multi()
    sys.argv[0] = "mergekit-yaml"
    return run_yaml()


if __name__ == "__main__":
    sys.exit(main())
