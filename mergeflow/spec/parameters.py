"""Check every `parameters:` block against the merge method (METHODS.md, "Parameters").

Errors: a value that is not a number (or not a boolean for a boolean parameter), NaN or
Inf anywhere, an empty gradient, a value outside the parameter's range, a required
parameter given nowhere, and a name that is a close misspelling of one of the method's own
parameters without being a parameter of any method (`densty` for ties).

Warnings, one per distinct cause, for what mergekit 0.1.5 accepts and silently ignores or
extrapolates, so that such configs merge with mergekit's numbers: a parameter the method
does not use (`weight` for slerp, `random_seed`), a method-wide parameter set on one model
(`lambda` per model), a per-model parameter on the base model of a method that does not
weight the base, slerp `t` outside [0, 1], and `density` above 1.
"""

from __future__ import annotations

import math
from typing import Any

from mergeflow.methods import REGISTRY, Method, Param

ANY_METHOD = frozenset(p.name for m in REGISTRY.values() for p in m.params)

# names people put under `parameters:` that no method reads, and what they meant
NOT_PARAMETERS = {
    "random_seed": "the seed of the random methods is the `--random-seed` option",
    "dtype": "the compute dtype is the top-level `dtype:`",
    "out_dtype": "the output dtype is the top-level `out_dtype:`",
}

# declared by a method so that mergekit configs validate, and ignored by its kernel as by mergekit's
IGNORED_BY_METHOD = {
    ("karcher", "weight"): "karcher weighs every model equally (1/N)",
}


def extrapolation(method: Method, param: Param, value: Any) -> str | None:
    """A warning for a value outside `param`'s declared range that mergekit merges anyway
    (so mergeflow does, with its numbers), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if method.name == "slerp" and param.name == "t" and not 0 <= value <= 1:
        return (f"slerp `t` = {value} is outside [0, 1]: the result extrapolates beyond the two models "
                "(mergekit merges it the same way)")
    if param.name == "density" and param.high == 1 and value > 1:
        return f"`density` = {value} is above 1: every value is kept, as with 1 (as in mergekit)"
    return None


def parameter_problems(data: dict, groups: list, method: Method, found) -> None:
    """Check names, scopes and values of every block; then required parameters per group."""
    seen: set[tuple] = set()
    for group in groups:
        for loc, params in group.shared:
            if params is not None and loc not in seen:
                seen.add(loc)
                _block(params, loc, method, found, model_level=False, on_base=False)
        for entry in group.entries:
            if entry.params is not None:
                on_base = method.base != "input" and entry.ref is not None and entry.ref == group.base
                _block(entry.params, entry.loc + ("parameters",), method, found, model_level=True, on_base=on_base)
        _required(group, method, found)


def _block(params: dict, loc: tuple, method: Method, found, *, model_level: bool, on_base: bool) -> None:
    names = [p.name for p in method.params]
    for key, setting in params.items():
        name, at = str(key), loc + (key,)
        _finite(name, setting, at, found)
        param = method.param(name)
        if param is None:
            _unknown(name, names, at, method, found)
        elif (method.name, name) in IGNORED_BY_METHOD:
            found.warn(("unused", name), at, f"`{name}` is ignored: {IGNORED_BY_METHOD[method.name, name]}, "
                       "as in mergekit")
        elif model_level and not param.per_model:
            found.warn(("model-level", name), at, f"`{name}` applies to the whole {method.name} merge; set on one "
                       "model it is ignored, as mergekit ignores it; move it to the top-level (or slice) "
                       "`parameters:` to use it")
        elif on_base:
            found.warn(("on-base", name), at, f"`{name}` on the base model is not used by {method.name} (the base "
                       "is not one of the weighted models); ignored, as in mergekit")
        elif not _empty(name, setting, at, found):
            for value, vloc in leaf_values(setting, at):
                _value(method, param, value, vloc, found)


def _unknown(name: str, names: list[str], at: tuple, method: Method, found) -> None:
    from mergeflow.spec.config import suggest

    takes = ", ".join(f"`{n}`" for n in names) or "no parameters"
    if name in NOT_PARAMETERS:
        found.warn(("unused", name), at, f"`{name}` is not a merge parameter and is ignored (mergekit ignores it "
                   f"too); {NOT_PARAMETERS[name]}")
    elif name in ANY_METHOD:
        found.warn(("unused", name), at, f"`{name}` is not a parameter of {method.name} ({method.name} takes "
                   f"{takes}); it is ignored, as mergekit ignores it")
    elif suggest(name, names):
        found.problem(at, f"`{name}` is not a parameter of {method.name}{suggest(name, names)}")
    else:
        found.warn(("unused", name), at, f"`{name}` is not a parameter of any merge method ({method.name} takes "
                   f"{takes}); it is ignored, as mergekit ignores it")


def leaf_values(setting: Any, loc: tuple):
    """(value, location) of every number in a setting: scalars, gradients, filter entries."""
    if isinstance(setting, dict):
        yield from leaf_values(setting.get("value"), loc + ("value",))
    elif isinstance(setting, list):
        for i, item in enumerate(setting):
            yield from leaf_values(item, loc + (i,))
    elif setting is not None:
        yield setting, loc


def _empty(name: str, setting: Any, loc: tuple, found) -> bool:
    """An empty gradient, at the top or in a filter entry (mergekit would silently skip it)."""
    entries = [setting] if isinstance(setting, dict) else setting if isinstance(setting, list) else []
    if isinstance(setting, list) and not setting:
        found.problem(loc, f"`{name}` is an empty list; a gradient needs at least one number (or give a "
                      "single number)")
        return True
    empty = [i for i, e in enumerate(entries) if isinstance(e, dict) and e.get("value") == []]
    for i in empty:
        at = loc + (("value",) if isinstance(setting, dict) else (i, "value"))
        found.problem(at, f"`{name}` has a filter entry whose value is an empty list; a gradient needs at "
                      "least one number")
    return bool(empty)


def _finite(name: str, setting: Any, loc: tuple, found) -> None:
    for value, vloc in leaf_values(setting, loc):
        if isinstance(value, float) and not math.isfinite(value):
            what = "NaN" if math.isnan(value) else "infinite"
            found.problem(vloc, f"`{name}` is {what}; every parameter must be a finite number")


def _value(method: Method, param: Param, value: Any, loc: tuple, found) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        return  # reported by _finite_and_nonempty
    if param.type is bool:
        if not (isinstance(value, bool) or value in (0, 1)):
            found.problem(loc, f"{param.name} must be true or false, got {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return  # the schema reports values that are not numbers
    if param.type is int and not float(value).is_integer():
        found.problem(loc, f"{param.name} must be a whole number, got {value!r}")
        return
    lenient = extrapolation(method, param, value)
    if lenient:
        found.warn(("extrapolation", param.name), loc, lenient)
        return
    msg = param.check(value)
    if msg:
        found.problem(loc, msg)


def _mentions(levels, name: str) -> bool:
    return any(params is not None and name in params for params in levels)


def _required(group, method: Method, found) -> None:
    """A required parameter given at no level that could supply it (the planner checks
    again per tensor, where filters may leave gaps)."""
    shared = [params for _, params in group.shared]
    for param in method.params:
        if not param.required:
            continue
        if not param.per_model:
            if not _mentions(shared, param.name):
                found.problem(group.loc, f"{method.name} needs `{param.name}`; set it in the top-level "
                              "`parameters:`")
            continue
        for entry in group.entries:
            if method.base != "input" and entry.ref is not None and entry.ref == group.base:
                continue
            if not _mentions([entry.params, *shared], param.name):
                found.problem(entry.loc, f"{method.name} needs `{param.name}` for model `{entry.ref}`; set it "
                              "under this model's `parameters:` or in the top-level `parameters:`")
