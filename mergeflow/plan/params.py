"""Resolve a method's parameters for one tensor: gradients, filters and precedence.

METHODS.md, "Parameters": a setting is a number, a gradient (list of numbers interpolated
at t), or a list of `{filter, value}` entries where the first match wins and no match falls
through to the next level. Levels, highest first: the model's own (source) parameters, the
slice's, the top level's, the method default.
"""

from __future__ import annotations

import math
from typing import Any

from mergeflow.methods.base import Method, Param
from mergeflow.spec.config import Conditional, MergeConfig
from mergeflow.spec.parameters import extrapolation

MISSING = object()


def evaluate(setting: Any, tensor: str, t: float, kind: type = float) -> Any:
    """The value of one setting for `tensor` at gradient position t, or MISSING."""
    if setting is None:
        return MISSING
    if hasattr(setting, "value") and hasattr(setting, "filter"):  # a Conditional entry
        setting = [setting]
    if isinstance(setting, (bool, int, float)):
        return setting
    if not setting:
        return MISSING
    if all(isinstance(v, (bool, int, float)) for v in setting):
        return gradient(list(setting), t, kind)
    for entry in setting:
        if entry.filter is None or entry.filter == "*" or entry.filter in tensor:
            return evaluate(entry.value, tensor, t, kind)
    return MISSING


def gradient(values: list, t: float, kind: type = float) -> Any:
    """Interpolate a gradient: s = t(L-1), v = (1-f) v[i] + f v[min(i+1, L-1)]."""
    if len(values) == 1:
        return values[0]
    s = t * (len(values) - 1)
    i = math.floor(s)
    if kind is bool or any(isinstance(v, bool) for v in values):
        return values[int(s)]  # discrete values are picked, not interpolated
    f = s - i
    return (1 - f) * values[i] + f * values[min(i + 1, len(values) - 1)]


def coerce(param: Param, value: Any) -> Any:
    if value is None:
        return None
    if param.type is bool:
        return bool(value)
    if param.type is int:
        return int(round(value))
    return float(value)


def resolve(param: Param, levels: list[dict | None], tensor: str, t: float) -> Any:
    """First level that gives a value for `param` wins; else its default (or MISSING)."""
    for level in levels:
        if level and param.name in level:
            value = evaluate(level[param.name], tensor, t, param.type)
            if value is not MISSING:
                return coerce(param, value)
    if param.required:
        return MISSING
    return param.default


def resolve_all(method: Method, tensor: str, t: float, models: list[dict | None],
                shared: list[dict | None], names: list[str] | None = None,
                ) -> tuple[dict[str, Any], list[tuple[str, int]]]:
    """All parameters of `method` for one tensor.

    `models[i]` is the i-th input's own parameters; `shared` the slice, module and top
    levels. Filters of method-wide parameters match the output tensor's name; those of
    per-model parameters match each input's own tensor name (`names[i]`, the output name
    when not given), as in mergekit: in a frankenmerge, `filter: layers.3.` on a source
    means that source's layer 3. Returns (values, missing) where per-model values are tuples
    aligned with `models`, and `missing` lists (parameter, input index) pairs of required
    values given nowhere.
    """
    values: dict[str, Any] = {}
    missing: list[tuple[str, int]] = []
    for param in method.params:
        if param.per_model:
            row = []
            for i, own in enumerate(models):
                v = resolve(param, [own, *shared], names[i] if names else tensor, t)
                if v is MISSING:
                    missing.append((param.name, i))
                row.append(None if v is MISSING else v)
            values[param.name] = tuple(row)
        else:
            v = resolve(param, list(shared), tensor, t)
            if v is MISSING:
                missing.append((param.name, -1))
            values[param.name] = None if v is MISSING else v
    return values, missing


def check_values(method: Method, values: dict[str, Any]) -> list[str]:
    """Range checks on resolved values, then the method's cross-parameter check per model."""
    problems = []
    for param in method.params:
        v = values.get(param.name)
        for item in (v if param.per_model else (v,)):
            msg = param.check(item) if item is not None else None
            if msg and extrapolation(method, param, item) is None:  # those are warned about by spec/
                problems.append(msg)
    if method.check is not None:
        n = max((len(v) for p in method.params if p.per_model for v in [values[p.name]]), default=1)
        for i in range(n):
            one = {p.name: (values[p.name][i] if p.per_model else values[p.name]) for p in method.params}
            msg = method.check(one)
            if msg:
                problems.append(msg)
    return problems


def filter_locations(config: MergeConfig):
    """(filter text, YAML location) of every `{filter, value}` entry with a real filter."""
    for loc, params in _param_blocks(config):
        for name, setting in (params or {}).items():
            entries = [setting] if isinstance(setting, Conditional) else setting if isinstance(setting, list) else []
            for j, entry in enumerate(entries):
                if isinstance(entry, Conditional) and entry.filter not in (None, "*"):
                    at = loc + (name,) + (() if isinstance(setting, Conditional) else (j,)) + ("filter",)
                    yield entry.filter, at


def _param_blocks(config: MergeConfig):
    yield ("parameters",), config.parameters
    for i, m in enumerate(config.models or []):
        yield ("models", i, "parameters"), m.parameters
    yield from _slice_blocks(config.slices or [], ("slices",))
    for name, module in (config.modules or {}).items():
        yield ("modules", name, "parameters"), module.parameters
        for i, m in enumerate(module.models or []):
            yield ("modules", name, "models", i, "parameters"), m.parameters
        yield from _slice_blocks(module.slices or [], ("modules", name, "slices"))


def _slice_blocks(slices, loc: tuple):
    for i, sl in enumerate(slices):
        yield loc + (i, "parameters"), sl.parameters
        for j, src in enumerate(sl.sources):
            yield loc + (i, "sources", j, "parameters"), src.parameters


def filter_warnings(config: MergeConfig, tensors) -> list[str]:
    """A warning per filter that no tensor of the merge (output or input name) contains:
    its value is never used, which is usually a typo (`self_atn`)."""
    names = {t.name for t in tensors} | {i.tensor.name for t in tensors for i in t.all_inputs()}
    out, seen = [], set()
    for text, loc in filter_locations(config):
        if text in seen or any(text in n for n in names):
            continue
        seen.add(text)
        example = min((n for n in names if ".layers." in n), default=min(names, default="?"), key=len)
        out.append(f"{config.where(loc)}: filter `{text}` matches no tensor of this merge, so its value is never "
                   f"used; a filter is a substring of tensor names such as `{example}`")
    return out
