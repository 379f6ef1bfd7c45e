"""Settle the raw YAML data before the schema sees it: unknown keys and numbers in strings.

mergekit 0.1.5's pydantic models ignore keys they do not know, so a config with
`architecture:` at the top merges there; here it merges too, with a warning saying the key
is ignored. A key that is a close misspelling of a key valid at that place (`paramters`,
`merge_methods`) stays an error with a did-you-mean: mergekit would silently merge without
the setting the user meant. Parameter values written as strings that pydantic reads as
numbers (`1e-5`, which YAML 1.1 reads as a string) become numbers, as mergekit reads them.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import TypeAdapter, ValidationError

from mergeflow.methods import REGISTRY
from mergeflow.spec.config import (
    INTERNAL,
    InputModel,
    InputSlice,
    MergeConfig,
    ModelTokenEmbedding,
    OutputModule,
    OutputSlice,
    TokenEmbedding,
    TokenizerConfig,
    suggest,
)

_FLOAT = TypeAdapter(float)
_INT_TEXT = re.compile(r"^\s*[+-]?\d+\s*$")


def _fields(model) -> list[str]:
    return [f for f in model.model_fields if f not in INTERNAL]


TOP, MODEL, SLICE, SOURCE = _fields(MergeConfig), _fields(InputModel), _fields(OutputSlice), _fields(InputSlice)
MODULE, TOKENIZER, TOKEN = _fields(OutputModule), _fields(TokenizerConfig), _fields(TokenEmbedding)
TOKEN_SOURCE = _fields(ModelTokenEmbedding)

# keys mergekit accepts and never uses: said as such rather than as "unknown"
IGNORED = {
    "residual_weight": "`residual_weight` is ignored (mergekit 0.1.5 reads it and never uses it)",
}
MODULE_IGNORED = {
    "merge_method": "every module is merged with the top-level `merge_method` (mergekit 0.1.5 has no "
                    "per-module method); `merge_method` here is ignored",
    "base_model": "a module takes the top-level `base_model` (or a slice's); `base_model` here is ignored",
}


def settle(data: dict, found) -> dict:
    """A copy of the top-level mapping with unknown keys dropped (warned or refused) and
    numeric strings in parameter values turned into numbers."""
    out = _known(data, (), TOP, found)
    if isinstance(out.get("models"), list):
        out["models"] = _models(out["models"], ("models",), found)
    if isinstance(out.get("slices"), list):
        out["slices"] = _slices(out["slices"], ("slices",), found)
    if isinstance(out.get("modules"), dict):
        out["modules"] = {name: _module(m, ("modules", name), found) if isinstance(m, dict) else m
                          for name, m in out["modules"].items()}
    if isinstance(out.get("tokenizer"), dict):
        out["tokenizer"] = _tokenizer(out["tokenizer"], ("tokenizer",), found)
    return _with_params(out, ())


def _known(obj: dict, loc: tuple, fields: list[str], found, ignored: dict | None = None) -> dict:
    out = {}
    for key, value in obj.items():
        name = str(key)
        if name in fields and name in IGNORED:
            found.warn(("ignored", name), loc + (key,), IGNORED[name])
            continue
        if name in fields:
            out[name] = value
        elif ignored and name in ignored:
            found.warn(("ignored", loc[:1], name), loc + (key,), ignored[name])
        elif suggest(name, fields):
            found.problem(loc + (key,), f"unknown key `{name}`{suggest(name, fields)}")
        else:
            place = f"under `{loc[-1] if isinstance(loc[-1], str) else loc[-2]}`" if loc else "at the top level"
            found.warn(("unknown", name), loc + (key,), f"unknown key `{name}` {place} is ignored, as mergekit "
                       "ignores it")
    return out


def _with_params(obj: dict, loc: tuple) -> dict:
    if isinstance(obj.get("parameters"), dict):
        obj["parameters"] = {k: coerce_numbers(v) for k, v in obj["parameters"].items()}
    return obj


def _models(items: list, loc: tuple, found) -> list:
    return [_with_params(_known(m, loc + (i,), MODEL, found), loc + (i,)) if isinstance(m, dict) else m
            for i, m in enumerate(items)]


def _slices(items: list, loc: tuple, found) -> list:
    out = []
    for i, sl in enumerate(items):
        if isinstance(sl, dict):
            sl = _with_params(_known(sl, loc + (i,), SLICE, found), loc + (i,))
            if isinstance(sl.get("sources"), list):
                sl["sources"] = [_with_params(_known(s, loc + (i, "sources", j), SOURCE, found), ())
                                 if isinstance(s, dict) else s for j, s in enumerate(sl["sources"])]
        out.append(sl)
    return out


def _module(module: dict, loc: tuple, found) -> dict:
    out = _with_params(_known(module, loc, MODULE, found, MODULE_IGNORED), loc)
    if isinstance(out.get("models"), list):
        out["models"] = _models(out["models"], loc + ("models",), found)
    if isinstance(out.get("slices"), list):
        out["slices"] = _slices(out["slices"], loc + ("slices",), found)
    return out


def _tokenizer(tok: dict, loc: tuple, found) -> dict:
    out = _known(tok, loc, TOKENIZER, found)
    if isinstance(out.get("tokens"), dict):
        tokens = {}
        for name, entry in out["tokens"].items():
            if isinstance(entry, dict):
                entry = _known(entry, loc + ("tokens", name), TOKEN, found)
                src = entry.get("source")
                if isinstance(src, dict) and "kind" in src:
                    entry["source"] = _known(src, loc + ("tokens", name, "source"), TOKEN_SOURCE, found)
            tokens[name] = entry
        out["tokens"] = tokens
    return out


def coerce_numbers(setting: Any) -> Any:
    """A parameter setting with numeric strings read as numbers (`"1e-5"` -> 1e-05)."""
    if isinstance(setting, str):
        return number(setting)
    if isinstance(setting, list):
        return [coerce_numbers(v) for v in setting]
    if isinstance(setting, dict) and "value" in setting:
        return {**setting, "value": coerce_numbers(setting["value"])}
    return setting


def number(text: str) -> Any:
    """`text` as pydantic (so mergekit) reads it as a number, or unchanged when it is not one."""
    if _INT_TEXT.match(text):
        return int(text)
    try:
        return _FLOAT.validate_python(text)
    except ValidationError:
        return text


def used_parameters(data: dict) -> dict:
    """The data with every parameter the merge method does not read dropped (checks.py has
    warned about each), so that what mergekit ignores is ignored here too, whatever its value."""
    method = REGISTRY.get(data.get("merge_method")) if isinstance(data.get("merge_method"), str) else None
    if method is None:
        return data

    def keep(obj: Any, model_level: bool) -> Any:
        if not isinstance(obj, dict) or not isinstance(obj.get("parameters"), dict):
            return obj
        params = {k: v for k, v in obj["parameters"].items() if (p := method.param(str(k))) is not None
                  and (p.per_model or not model_level)}
        return {**obj, "parameters": params}

    def slices(items: Any) -> Any:
        if not isinstance(items, list):
            return items
        return [{**keep(sl, False), "sources": [keep(s, True) for s in sl["sources"]]}
                if isinstance(sl, dict) and isinstance(sl.get("sources"), list) else keep(sl, False) for sl in items]

    def models(items: Any) -> Any:
        return [keep(m, True) for m in items] if isinstance(items, list) else items

    out = keep(data, False)
    out = {**out, **({"models": models(out["models"])} if "models" in out else {}),
           **({"slices": slices(out["slices"])} if "slices" in out else {})}
    if isinstance(out.get("modules"), dict):
        out["modules"] = {name: {**keep(m, False), **({"models": models(m["models"])} if "models" in m else {}),
                                 **({"slices": slices(m["slices"])} if "slices" in m else {})}
                          if isinstance(m, dict) else m for name, m in out["modules"].items()}
    return out
