"""How the inputs of one output tensor must agree before it is merged (mergekit 0.1.5's rules).

Every input of a tensor has one shape, for every method. A vocab tensor (dim 0 indexed by
token) whose row counts differ, the other dims agreeing, is refused unless
unsafe_truncate_embeddings cuts every input to the fewest rows (with a tokenizer setting the
planner aligns rows by token instead and never asks here). An integer tensor is copied, never
merged, so it must have one dtype and shape in every model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mergeflow.sources.tensors import TensorInfo


@dataclass(frozen=True)
class Src:
    """One model's stored tensor for one output tensor, and how much of it to keep."""

    model: int  # index into the plan's models
    info: TensorInfo
    params: dict | None
    crop: tuple[int, ...] | None = None  # keep [:crop[0], :crop[1], ...]


def listed(srcs: list[Src], label: Callable[[int], str], dtype: bool = False) -> str:
    """`model: 384x64, model: 400x64` (with the dtype codes when `dtype`)."""
    return ", ".join(f"{label(s.model)}: " + (f"{s.info.dtype} " if dtype else "")
                     + "x".join(map(str, s.info.shape)) for s in srcs)


def buffer_problem(name: str, srcs: list[Src], label: Callable[[int], str]) -> str | None:
    """Why an integer tensor cannot be copied from one model (None: it can)."""
    if len({s.info.dtype for s in srcs}) == 1 and len({tuple(s.info.shape) for s in srcs}) == 1:
        return None
    return (f"{name} differs in dtype or shape between the models ({listed(srcs, label, dtype=True)}); "
            "an integer tensor is copied, never merged, so every model must hold the same one. "
            "Re-save the model whose tensor differs")


@dataclass(frozen=True)
class Agreement:
    """The inputs cut to one shape, or the problem that refuses the tensor."""

    found: list[Src]
    base: Src | None
    problem: str | None = None
    warning: str | None = None  # set when truncated (unsafe_truncate_embeddings)


def same_shape(name: str, found: list[Src], base: Src | None, label: Callable[[int], str],
               vocab: bool, truncate: bool) -> Agreement:
    every = found + ([base] if base else [])
    shapes = [tuple(s.info.shape) for s in every]
    if len(set(shapes)) <= 1:
        return Agreement(found, base)
    text = listed(every, label)
    if not vocab or not all(shapes) or len({s[1:] for s in shapes}) > 1:
        hint = "; vocabularies can be aligned, hidden sizes cannot" if vocab else ""
        return Agreement([], None, f"merge of {name}: shapes differ ({text}){hint}")
    rows = min(s[0] for s in shapes)
    if not truncate or rows == 0:
        return Agreement([], None, f"merge of {name}: the models' vocabularies differ in size ({text}). Set "
                         "`tokenizer_source: union` (or base, or a model) to align the rows by token, or pass "
                         f"--unsafe-truncate-embeddings to keep only the first {rows} rows of each (as mergekit "
                         "does; safe only if those ids mean the same tokens in every model)")
    target = (rows, *shapes[0][1:])
    warning = (f"{name}: UNSAFE truncation (--unsafe-truncate-embeddings): {text} cut to "
               f"{'x'.join(map(str, target))}. This assumes the first {rows} token ids mean the same tokens "
               "in every model; if not, the merged model is corrupt. `tokenizer_source: base` aligns them "
               "by token instead")
    return Agreement([cut(s, target) for s in found], cut(base, target) if base else None, warning=warning)


def cut(src: Src, target: tuple[int, ...]) -> Src:
    crop = None if tuple(src.info.shape) == target else target
    return Src(src.model, src.info, src.params, crop)
