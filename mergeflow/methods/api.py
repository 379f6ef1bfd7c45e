"""Merges of in-memory tensors and state dicts: `merge_tensors`, `merge_state_dicts`.

The same methods, parameters and numbers as a config run, for tensors already in memory (as
mergekit's merge_tensors / merge_state_dicts offer). A parameter is a number (every input), a
sequence in input order, or a mapping keyed by input ids; the base's entry of a per-model
parameter is ignored for methods that take a base apart (as in a config, where the base needs
none). Random methods draw from (`seed`, `name`, model index), as a config run with
`--random-seed seed` does for the tensor called `name`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

from mergeflow.errors import MergeflowError
from mergeflow.methods import REGISTRY
from mergeflow.methods.base import Method
from mergeflow.methods.draws import stream_keys
from mergeflow.methods.passes import run_whole


def merge_tensors(tensors: Sequence[torch.Tensor], method: str | Method, *,
                  parameters: Mapping[str, Any] | None = None, ids: Sequence[Hashable] | None = None,
                  base_index: int | None = None, name: str = "tensor", dtype: torch.dtype | None = None,
                  out_dtype: torch.dtype | None = None, seed: int = 0) -> torch.Tensor:
    """Merge the inputs of one output tensor with `method` (a name, as `merge_method:`).

    `tensors`: the inputs in config order; `base_index`: which of them is the base model's;
    `ids`: the inputs' names for mapping-valued parameters (default: their indices);
    `dtype`: the compute dtype (default: the inputs' promoted dtype); `out_dtype`: the result's
    (default: the compute dtype). Raises MergeflowError for an unknown method or parameter, a
    missing required one, a value out of range, or inputs that do not fit the method."""
    m = _method(method)
    tensors = list(tensors)
    if not tensors:
        raise MergeflowError(f"merge of {name}: no input tensors")
    ids = list(ids) if ids is not None else list(range(len(tensors)))
    if len(ids) != len(tensors) or len(set(ids)) != len(ids):
        raise MergeflowError(f"merge of {name}: ids must name each of the {len(tensors)} inputs once")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise MergeflowError(f"merge of {name}: the inputs' shapes differ ({sorted(shapes)})")
    work = dtype or _promoted(tensors)
    tensors = [t if t.dtype == work else t.to(work) for t in tensors]
    if m.base == "input" or base_index is None:
        if m.base == "required":
            raise MergeflowError(f"merge of {name}: {m.name} needs a base model: give base_index")
        keep = list(range(len(tensors)))
        base = None
    else:
        keep = [i for i in range(len(tensors)) if i != base_index]
        base = tensors[base_index]
    xs = [tensors[i] for i in keep]
    _check_counts(m, len(xs), name)
    params = _resolve(m, parameters or {}, [ids[i] for i in keep], ids, name)
    keys = stream_keys(seed, name, len(xs)) if m.random else ()
    try:
        out = run_whole(m.program, xs, base, {**m.preset, **params}, keys=keys)
    except ValueError as e:
        raise MergeflowError(f"merge of {name}: {e}") from None
    return out.to(out_dtype or work)


def merge_state_dicts(models: Mapping[Hashable, Any] | Sequence[Any], method: str | Method, *,
                      parameters: Mapping[str, Any] | None = None, base: Hashable | None = None,
                      strict: bool = True, dtype: torch.dtype | None = None,
                      out_dtype: torch.dtype | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Merge whole models in memory: state dicts or torch modules, a mapping id -> model or a
    sequence (ids 0, 1, ...); `base`: the base model's id. Every floating tensor is merged
    with `merge_tensors` (named as in the state dict, so random methods draw as a config run
    does for it); a non-floating tensor (a buffer) is copied when every model holds the same
    one, else refused. `strict`: every model has the same tensor names (else: the names all
    share are merged)."""
    items = list(models.items()) if isinstance(models, Mapping) else list(enumerate(models))
    if not items:
        raise MergeflowError("merge_state_dicts: no models")
    ids = [i for i, _ in items]
    if base is not None and base not in ids:
        raise MergeflowError(f"merge_state_dicts: base {base!r} is not one of the models {ids}")
    dicts = [_state_dict(m, i) for i, m in items]
    names = [set(d) for d in dicts]
    if strict and any(n != names[0] for n in names[1:]):
        extra = {i: sorted(set.union(*names) - n)[:3] for i, n in zip(ids, names) if n != set.union(*names)}
        raise MergeflowError(f"merge_state_dicts: the models' tensor names differ (each lacks: {extra}); "
                             "pass strict=False to merge the names they share")
    out = {}
    for name in (k for k in dicts[0] if all(k in d for d in dicts)):
        tensors = [d[name].detach() for d in dicts]
        if not tensors[0].is_floating_point():
            if any(t.dtype != tensors[0].dtype or not torch.equal(t, tensors[0]) for t in tensors[1:]):
                raise MergeflowError(f"merge_state_dicts: {name} is not a float tensor and the models "
                                     "hold different values; it cannot be merged")
            out[name] = tensors[0]
            continue
        out[name] = merge_tensors(tensors, method, parameters=parameters, ids=ids,
                                  base_index=ids.index(base) if base is not None else None, name=name,
                                  dtype=dtype, out_dtype=out_dtype, seed=seed)
    return out


def _method(method: str | Method) -> Method:
    if isinstance(method, Method):
        return method
    if method not in REGISTRY:
        import difflib

        close = difflib.get_close_matches(str(method), list(REGISTRY), n=1)
        raise MergeflowError(f"unknown merge method {method!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                             + f"; one of {', '.join(REGISTRY)}")
    return REGISTRY[method]


def _promoted(tensors: list[torch.Tensor]) -> torch.dtype:
    dt = tensors[0].dtype
    for t in tensors[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def _check_counts(m: Method, n: int, name: str) -> None:
    what = "input" if m.base == "input" else "non-base input"
    if n < m.min_inputs or (m.max_inputs is not None and n > m.max_inputs):
        most = "" if m.max_inputs is None else f" and at most {m.max_inputs}"
        raise MergeflowError(f"merge of {name}: {m.name} takes at least {m.min_inputs}{most} {what}(s), got {n}")


def _resolve(m: Method, given: Mapping[str, Any], kept: list, ids: list, name: str) -> dict[str, Any]:
    """Every parameter of `m` for the kept inputs: given (broadcast, per input, or by id), or
    its default; checked against its declaration."""
    unknown = sorted(set(given) - {p.name for p in m.params})
    if unknown:
        raise MergeflowError(f"merge of {name}: {', '.join(map(repr, unknown))} is not a parameter of {m.name}; "
                             f"it takes {', '.join(p.name for p in m.params) or 'none'}")
    out: dict[str, Any] = {}
    for p in m.params:
        if p.name not in given:
            if p.required:
                raise MergeflowError(f"merge of {name}: {m.name} needs {p.name!r}")
            out[p.name] = [p.default] * len(kept) if p.per_model else p.default
            continue
        value = given[p.name]
        if p.per_model:
            if isinstance(value, Mapping):
                missing = [i for i in kept if i not in value]
                if missing and p.required:
                    raise MergeflowError(f"merge of {name}: {p.name!r} has no value for input(s) {missing}")
                values = [value.get(i, p.default) for i in kept]
            elif isinstance(value, (list, tuple)):
                if len(value) != len(ids):
                    raise MergeflowError(f"merge of {name}: {p.name!r} has {len(value)} values for "
                                         f"{len(ids)} inputs")
                values = [value[ids.index(i)] for i in kept]
            else:
                values = [value] * len(kept)
        elif isinstance(value, (Mapping, list, tuple)):
            raise MergeflowError(f"merge of {name}: {p.name!r} applies to the whole merge: give one value")
        else:
            values = [value]
        for v in values:
            problem = _problem(p, v)
            if problem:
                raise MergeflowError(f"merge of {name}: {problem}")
        out[p.name] = values if p.per_model else values[0]
    return out


def _problem(p, value) -> str | None:
    if value is None:
        return None if not p.required else f"{p.name} needs a value"
    if p.type is bool:
        return None if isinstance(value, bool) or value in (0, 1) else f"{p.name} must be true or false"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        return f"{p.name} must be a finite number, got {value!r}"
    return p.check(value)


def _state_dict(model: Any, key: Hashable) -> Mapping[str, torch.Tensor]:
    if isinstance(model, torch.nn.Module):
        model = model.state_dict()
    if not isinstance(model, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in model.items()):
        raise MergeflowError(f"merge_state_dicts: model {key!r} is not a state dict (names to tensors) "
                             "or a torch module")
    return model
