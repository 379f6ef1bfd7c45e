"""Checks beyond the schema: method, layout, dtypes, layer ranges, inputs, tokenizer, modules.

Every check reads the settled raw data (so it runs even where the schema failed) and adds
located problems or warnings to one Findings. A merge *group* is one set of models merged
together: the top-level `models:`, one slice, or one module's models or slice; the input
rules (base model, counts, duplicates) and parameter levels apply per group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergeflow.dtypes import DTYPES
from mergeflow.methods import REGISTRY, Method
from mergeflow.spec.chat_templates import template_problem
from mergeflow.spec.config import ModelRef, suggest
from mergeflow.spec.reader import Positions, line_key, locate


@dataclass
class Findings:
    """Problems (errors) and warnings found in one config, each located."""

    path: str
    positions: Positions
    problems: list[str] = field(default_factory=list)
    _warned: dict[Any, list] = field(default_factory=dict)

    def at(self, loc: tuple) -> str:
        return locate(self.path, self.positions, loc)

    def problem(self, loc: tuple, msg: str) -> None:
        self.problems.append(f"{self.at(loc)}: {msg}")

    def warn(self, cause: Any, loc: tuple, msg: str) -> None:
        """One warning per distinct cause: later places are listed on the first one."""
        self._warned.setdefault(cause, [loc, msg, []])[2].append(loc)

    def warnings(self) -> list[str]:
        out = []
        for loc, msg, locs in self._warned.values():
            more = list(dict.fromkeys(self._place(m) for m in locs if self._place(m) != self._place(loc)))
            if more and self.positions:
                msg += f" (also at line{'s' if len(more) > 1 else ''} {', '.join(more)})"
            elif more:
                msg += f" (also at {', '.join(more)})"
            out.append(f"{self.at(loc)}: {msg}")
        return sorted(out, key=line_key)

    def _place(self, loc: tuple) -> str:
        """A short name for a place: its line, or its key path when there are no lines."""
        where = self.at(loc)
        if not self.positions:
            return where.split(": ", 1)[-1]
        return where[len(self.path) + 1:].split(":")[0]


@dataclass(frozen=True)
class Entry:
    """One model of a group: its reference (as written), its YAML location, its parameters."""

    ref: str | None
    loc: tuple
    params: dict | None


@dataclass(frozen=True)
class Group:
    loc: tuple
    entries: tuple[Entry, ...]
    base: str | None
    shared: tuple[tuple[tuple, dict | None], ...]  # (loc, params) of slice, module, top levels
    implicit_base: bool = False  # `models:`: the base joins the merge when not listed


def ref_str(value: Any) -> str | None:
    try:
        return str(ModelRef.parse(value)) if value is not None else None
    except ValueError:
        return None


def groups(data: dict) -> list[Group]:
    """Every merge group of the config, in config order."""
    top_base = ref_str(data.get("base_model"))
    top = (("parameters",), _dict(data.get("parameters")))
    out: list[Group] = []
    if isinstance(data.get("models"), list):
        out.append(_models_group(data["models"], ("models",), top_base, (top,)))
    if isinstance(data.get("slices"), list):
        out += _slice_groups(data["slices"], ("slices",), top_base, (top,))
    for name, module in (data.get("modules") or {}).items() if isinstance(data.get("modules"), dict) else ():
        if not isinstance(module, dict):
            continue
        level = (("modules", name, "parameters"), _dict(module.get("parameters")))
        if isinstance(module.get("models"), list):
            out.append(_models_group(module["models"], ("modules", name, "models"), top_base, (level, top)))
        if isinstance(module.get("slices"), list):
            out += _slice_groups(module["slices"], ("modules", name, "slices"), top_base, (level, top))
    return out


def _dict(value: Any) -> dict | None:
    return value if isinstance(value, dict) else None


def _models_group(models: list, loc: tuple, base: str | None, shared: tuple) -> Group:
    entries = tuple(Entry(ref_str(m.get("model")) if isinstance(m, dict) else None, loc + (i,),
                          _dict(m.get("parameters")) if isinstance(m, dict) else None)
                    for i, m in enumerate(models))
    return Group(loc, entries, base, shared, implicit_base=True)


def _slice_groups(slices: list, loc: tuple, top_base: str | None, shared: tuple) -> list[Group]:
    out = []
    for i, sl in enumerate(slices):
        if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list):
            continue
        entries = tuple(Entry(ref_str(s.get("model")) if isinstance(s, dict) else None,
                              loc + (i, "sources", j), _dict(s.get("parameters")) if isinstance(s, dict) else None)
                        for j, s in enumerate(sl["sources"]))
        level = (loc + (i, "parameters"), _dict(sl.get("parameters")))
        out.append(Group(loc + (i, "sources"), entries, ref_str(sl.get("base_model")) or top_base,
                         (level, *shared)))
    return out


def semantic_problems(data: dict, found: Findings) -> None:
    """Add every problem and warning beyond the schema to `found`."""
    from mergeflow.spec.parameters import parameter_problems

    name = data.get("merge_method")
    method = REGISTRY.get(name) if isinstance(name, str) else None
    if isinstance(name, str) and method is None:
        found.problem(("merge_method",), f"unknown merge_method `{name}`{suggest(name, sorted(REGISTRY))}; "
                      "`mergeflow methods` lists them")
    _layout_problems(data, found)
    for key in ("dtype", "out_dtype"):
        value = data.get(key)
        if value is not None and DTYPES.get(str(value)) is None:
            found.problem((key,), f"unknown {key} `{value}`{suggest(str(value), ['float32', 'float16', 'bfloat16'])}")
    for loc, slices in _slice_lists(data):
        _slice_problems(slices, loc, found)
    _tokenizer_problems(data, found)
    all_groups = groups(data)
    for group in all_groups:
        _duplicate_inputs(group, found)
    if method is not None:
        parameter_problems(data, all_groups, method, found)
        for group in all_groups:
            _input_problems(group, method, found)


def _layout_problems(data: dict, found: Findings) -> None:
    given = [k for k in ("models", "slices", "modules") if data.get(k)]
    if len(given) > 1:
        found.problem((given[1],), f"give exactly one of `models`, `slices` or `modules`, not "
                      f"{' and '.join(f'`{g}`' for g in given)}")
    elif not given:
        found.problem((), "nothing to merge: add a `models:` list, `slices:` or `modules:`")
    modules = data.get("modules")
    if modules is not None and not isinstance(modules, dict):
        return  # the schema says what `modules` must be
    for name, module in (modules or {}).items():
        if isinstance(module, dict):
            inner = [k for k in ("models", "slices") if module.get(k)]
            if len(inner) != 1:
                found.problem(("modules", name), f"module `{name}` needs exactly one of `models:` or `slices:`"
                              + (" (not both)" if inner else ""))


def _slice_lists(data: dict):
    if isinstance(data.get("slices"), list):
        yield ("slices",), data["slices"]
    if isinstance(data.get("modules"), dict):
        for name, module in data["modules"].items():
            if isinstance(module, dict) and isinstance(module.get("slices"), list):
                yield ("modules", name, "slices"), module["slices"]


def _slice_problems(slices: list, loc: tuple, found: Findings) -> None:
    for i, sl in enumerate(slices):
        sources = sl.get("sources") if isinstance(sl, dict) else None
        if not isinstance(sources, list):
            continue
        lengths = []
        for j, src in enumerate(sources):
            rng = src.get("layer_range") if isinstance(src, dict) else None
            if isinstance(rng, list) and len(rng) == 2 and all(isinstance(v, int) for v in rng):
                if rng[0] < 0 or rng[1] <= rng[0]:
                    found.problem(loc + (i, "sources", j, "layer_range"), f"layer_range {rng} is empty or "
                                  "negative; write [start, end) with start < end")
                lengths.append(rng[1] - rng[0])
        if len(set(lengths)) > 1:
            found.problem(loc + (i, "sources"), f"the sources of slice {i} have uneven layer counts {lengths}; "
                          "every source of a slice needs the same number of layers")


def _tokenizer_problems(data: dict, found: Findings) -> None:
    if data.get("tokenizer_source") is not None and data.get("tokenizer") is not None:
        found.problem(("tokenizer_source",), "give either `tokenizer_source` or a `tokenizer:` block (its "
                      "`source:` key), not both")
    _tokenizer_source(data.get("tokenizer_source"), ("tokenizer_source",), found)
    tok = data.get("tokenizer")
    if isinstance(tok, dict):
        _tokenizer_source(tok.get("source"), ("tokenizer", "source"), found)
    template = data.get("chat_template")
    if isinstance(template, str):
        msg = template_problem(template)
        if msg:
            found.problem(("chat_template",), msg)


def _tokenizer_source(value: Any, loc: tuple, found: Findings) -> None:
    """`unoin` is a typo, not a model: no `/` (so no Hub id), no such directory, close to a keyword."""
    if not isinstance(value, str) or value in ("union", "base"):
        return
    hint = suggest(value, ["union", "base"])
    if hint and "/" not in value and not Path(value).expanduser().exists():
        found.problem(loc, f"tokenizer source `{value}` is neither `union`, `base` nor a model (no such "
                      f"directory, and not a Hub id `org/name`){hint}")


def _duplicate_inputs(group: Group, found: Findings) -> None:
    first: dict[str, Entry] = {}
    for entry in group.entries:
        if entry.ref is None:
            continue
        if entry.ref in first:
            found.problem(entry.loc, f"model `{entry.ref}` is listed twice in one merge (first at "
                          f"{found.at(first[entry.ref].loc)}); mergekit refuses this too (\"Duplicate merge "
                          "inputs\"): list it once, with the weight you mean")
        else:
            first[entry.ref] = entry


def _input_problems(group: Group, method: Method, found: Findings) -> None:
    """Base-model rule and input counts."""
    refs = [e.ref for e in group.entries]
    if group.implicit_base and group.base and group.base not in refs:
        refs.append(group.base)
    base = group.base
    if method.base == "required" and not base:
        found.problem(group.loc, f"{method.name} needs a `base_model`; add `base_model: <model>` at the top level")
        return
    n = len(refs) if method.base == "input" else len([r for r in refs if r != base])
    if n < method.min_inputs:
        found.problem(group.loc, f"{method.name} needs at least {method.min_inputs} "
                      f"{'input' if method.base == 'input' else 'non-base'} model(s), got {n}")
    if method.max_inputs is not None and n > method.max_inputs:
        what = "model(s)" if method.base == "input" else "model(s) besides the base"
        found.problem(group.loc, f"{method.name} takes at most {method.max_inputs} {what}, got {n}")
