"""Read a merge config (the mergekit YAML format, unchanged) into frozen, validated models.

`load_config(path)` parses the YAML, checks it against a strict schema and against the
chosen method's declared parameters, and reports every problem at once, each located as
`file:line:col`, with a did-you-mean where a name is close. Nothing here reads a tensor.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

from mergeflow.dtypes import DTYPES
from mergeflow.errors import ConfigError
from mergeflow.methods import REGISTRY, Method
from mergeflow.spec.chat_templates import template_problem


@dataclass(frozen=True)
class ModelRef:
    """A model reference: a local directory or a Hub id, an optional @revision, +lora."""

    path: str
    revision: str | None = None
    lora: str | None = None

    @classmethod
    def parse(cls, value: Any) -> ModelRef:
        if isinstance(value, ModelRef):
            return value
        if isinstance(value, dict):  # mergekit's long form: {model: {path, revision}, lora}
            inner = value.get("model", value)
            if isinstance(inner, str):
                ref = cls.parse(inner)
            elif isinstance(inner, dict) and isinstance(inner.get("path"), str):
                ref = cls(inner["path"], inner.get("revision"))
            else:
                raise ValueError("a model is a string like `org/name@revision` or a path")
            lora = value.get("lora")
            if isinstance(lora, dict):
                lora = lora.get("path")
            return cls(ref.path, ref.revision, lora if lora is not None else ref.lora)
        if not isinstance(value, str) or not value.strip():
            raise ValueError("a model is a string: a local directory or a Hub id like `org/name`")
        text, lora = value.strip(), None
        if "+" in text:
            text, lora = text.split("+", 1)
        if text.count("@") > 1:
            raise ValueError(f"model {value!r} has more than one `@revision`")
        path, _, revision = text.partition("@")
        return cls(path, revision or None, lora or None)

    def __str__(self) -> str:
        out = self.path + (f"@{self.revision}" if self.revision else "")
        return out + (f"+{self.lora}" if self.lora else "")


def _model_ref(value: Any) -> ModelRef:
    return ModelRef.parse(value)


Ref = Annotated[ModelRef, BeforeValidator(_model_ref)]


def _source_ref(value: Any) -> ModelRef:
    """A model named as a tokenizer or token source; mergekit's older `model:<path>` form too."""
    if isinstance(value, dict) and "kind" in value:
        raise ValueError("`kind` must be `model_token` (with `model` and `token` or `token_id`) or `zero`")
    if isinstance(value, str) and value.startswith("model:"):
        value = value.removeprefix("model:")
    return ModelRef.parse(value)


SourceRef = Annotated[ModelRef, BeforeValidator(_source_ref)]
Scalar = Union[bool, int, float]  # noqa: UP007 (pydantic needs the order)
Gradient = list[Scalar]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class Conditional(Strict):
    """One `{filter, value}` entry: the first entry whose filter matches the tensor wins."""

    filter: str | None = None
    value: Scalar | Gradient


ParamSetting = Union[Scalar, Gradient, list[Conditional], Conditional]  # noqa: UP007
Params = dict[str, ParamSetting]


class InputModel(Strict):
    model: Ref
    parameters: Params | None = None


class InputSlice(Strict):
    model: Ref
    layer_range: tuple[int, int]
    parameters: Params | None = None


class OutputSlice(Strict):
    sources: list[InputSlice] = Field(min_length=1)
    base_model: Ref | None = None
    residual_weight: float | None = None
    parameters: Params | None = None


class ModelTokenEmbedding(Strict):
    kind: Literal["model_token"]
    model: Ref
    token_id: int | None = Field(default=None, ge=0)
    token: str | None = None

    @model_validator(mode="after")
    def _one_token(self) -> ModelTokenEmbedding:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("a `model_token` source names exactly one of `token` or `token_id`")
        return self


class ZeroEmbedding(Strict):
    kind: Literal["zero"]


def _source_kind(value: Any) -> str:
    """The union member a token `source:` is read as (tags in parentheses drop out of error paths)."""
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    return f"({kind})" if kind in ("model_token", "zero") else "(model)"


TokenSource = Annotated[Union[Annotated[ModelTokenEmbedding, Tag("(model_token)")],  # noqa: UP007
                              Annotated[ZeroEmbedding, Tag("(zero)")], Annotated[SourceRef, Tag("(model)")]],
                        Discriminator(_source_kind)]


class TokenEmbedding(Strict):
    source: TokenSource | None = None
    force: bool = False


class TokenizerConfig(Strict):
    source: Literal["union", "base"] | SourceRef = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = Field(default=None, gt=0)


class MergeConfig(Strict):
    """A whole merge config. `path`, `text` and `where` are filled by load_config."""

    merge_method: str
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    base_model: Ref | None = None
    parameters: Params | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: Literal["union", "base"] | SourceRef | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    embed_slerp: bool = False
    path: str = "<config>"
    text: str = ""
    positions: dict[tuple, tuple[int, int]] = Field(default_factory=dict, repr=False)

    @property
    def method(self) -> Method:
        return REGISTRY[self.merge_method]

    def where(self, loc: tuple) -> str:
        """`file:line:col` of the YAML node at `loc` (or of its nearest located parent)."""
        return locate(self.path, self.positions, loc)


# Which model class sits under which key: used to suggest the right key for a typo.
_CHILD_MODEL: dict[str, type[BaseModel]] = {
    "models": InputModel, "slices": OutputSlice, "sources": InputSlice,
    "tokenizer": TokenizerConfig, "tokens": TokenEmbedding, "source": ModelTokenEmbedding,
}


def locate(path: str, positions: dict[tuple, tuple[int, int]], loc: tuple) -> str:
    loc = tuple(loc)
    while loc and loc not in positions:
        loc = loc[:-1]
    line, col = positions.get(loc, (1, 1))
    return f"{path}:{line}:{col}"


def _positions(node: yaml.Node, loc: tuple = (), out: dict | None = None) -> dict:
    """Map every YAML node's path (keys and list indices) to its 1-based (line, col)."""
    out = {} if out is None else out
    out[loc] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            k = key.value
            out[loc + (k,)] = (key.start_mark.line + 1, key.start_mark.column + 1)
            _positions(value, loc + (k,), out)
            out[loc + (k,)] = (key.start_mark.line + 1, key.start_mark.column + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _positions(item, loc + (i,), out)
    return out


def suggest(name: str, options: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def load_config(path: str | Path) -> MergeConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(str(path), [f"{path}: cannot read the config: {e.strerror}"]) from e
    return parse_config(text, str(path))


def parse_config(text: str, path: str = "<config>", *, ignore: tuple[str, ...] = ()) -> MergeConfig:
    """Parse and validate config text; raise ConfigError listing every problem. Top-level keys
    in `ignore` are left out (a multi-stage file's `name:`, spec/multi.py)."""
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        several = "expected a single document" in str(getattr(e, "context", ""))
        hint = ("; a file of several merge documents is a multi-stage merge: run it with `mergeflow multi`"
                if several else "")
        raise ConfigError(path, [f"{where}: not valid YAML: {getattr(e, 'problem', e)}{hint}"]) from e
    if not isinstance(data, dict):
        raise ConfigError(path, [f"{path}:1:1: a merge config is a YAML mapping with `merge_method`"])
    data = {k: v for k, v in data.items() if k not in ignore}
    positions = _positions(node)
    problems = _schema_problems(data, path, positions)
    problems += semantic_problems(data, path, positions)
    if problems:
        raise ConfigError(path, sorted(_dedupe(problems), key=_line_key))
    return MergeConfig(**data, path=path, text=text, positions=positions)


def _line_key(problem: str) -> tuple:
    m = re.match(r"^.*?:(\d+):(\d+): ", problem)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _schema_problems(data: dict, path: str, positions: dict) -> list[str]:
    reserved = {"path", "text", "positions"} & set(data)
    problems = [f"{locate(path, positions, (k,))}: unknown key `{k}`" for k in sorted(reserved)]
    if "modules" in data:
        problems.append(f"{locate(path, positions, ('modules',))}: `modules` (multi-module "
                        "merges) is not supported yet; merge the text model with `models:` or `slices:`")
    clean = {k: v for k, v in data.items() if k not in reserved and k != "modules"}
    try:
        MergeConfig(**clean)
    except ValidationError as e:
        problems += [_format_error(err, path, positions) for err in _collapse_union(e.errors())]
    return problems


def _param_setting_loc(loc: tuple) -> tuple | None:
    """The `(..., 'parameters', name)` prefix of an error location inside a parameter value."""
    for i, part in enumerate(loc[:-1]):
        if part == "parameters" and isinstance(loc[i + 1], str):
            return loc[: i + 2]
    return None


def _collapse_union(errors: list[dict]) -> list[dict]:
    """Pydantic reports one error per union member; keep one per location, the most telling."""
    by_loc: dict[tuple, dict] = {}
    for err in errors:
        loc = tuple(p for p in err["loc"] if isinstance(p, int) or not _is_union_tag(p))
        setting = _param_setting_loc(loc)
        if setting is not None:  # one message per malformed parameter value
            loc, err = setting, {"type": "parameter_value", "msg": PARAM_VALUE_HELP}
        err = {**err, "loc": loc}
        prev = by_loc.get(loc)
        if prev is None or err["type"] == "extra_forbidden":
            by_loc[loc] = err
    # an error on a child makes its parent's union errors noise
    locs = list(by_loc)
    return [by_loc[loc] for loc in locs if not any(o != loc and o[: len(loc)] == loc for o in locs)
            or by_loc[loc]["type"] == "extra_forbidden"]


PARAM_VALUE_HELP = ("a parameter value is a number, a list of numbers (a gradient), or a list "
                    "of `{filter: <substring>, value: <number or gradient>}` entries")


def _is_union_tag(part: str) -> bool:
    return any(c in part for c in "[]()") or part in {
        "bool", "int", "float", "str", "Conditional", "ModelRef", "ModelTokenEmbedding",
        "ZeroEmbedding", "function-before", "literal['union','base']", "dict",
    } or part.startswith(("function-", "literal[", "json-or-python"))


def _format_error(err: dict, path: str, positions: dict) -> str:
    loc = err["loc"]
    where = locate(path, positions, loc)
    dotted = ".".join(str(p) for p in loc) or "config"
    if err["type"] == "extra_forbidden":
        key = str(loc[-1])
        parent = next((str(p) for p in reversed(loc[:-1]) if isinstance(p, str)), "")
        model = _CHILD_MODEL.get(parent, MergeConfig)
        fields = [f for f in model.model_fields if f not in {"path", "text", "positions"}]
        return f"{where}: unknown key `{key}`{suggest(key, fields)}"
    if err["type"] == "missing":
        return f"{where}: `{dotted}` is required"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: `{dotted}`: {msg}"


def semantic_problems(data: dict, path: str, positions: dict) -> list[str]:
    """Checks beyond the schema: method, parameter names and scopes, layout, layer ranges."""
    at = lambda loc: locate(path, positions, loc)  # noqa: E731
    problems: list[str] = []
    name = data.get("merge_method")
    method = REGISTRY.get(name) if isinstance(name, str) else None
    if isinstance(name, str) and method is None:
        problems.append(f"{at(('merge_method',))}: unknown merge_method `{name}`"
                        f"{suggest(name, sorted(REGISTRY))}; `mergeflow methods` lists them")
    models, slices = data.get("models"), data.get("slices")
    if models and slices:
        problems.append(f"{at(('slices',))}: give either `models` or `slices`, not both")
    elif not models and not slices and "modules" not in data:
        problems.append(f"{at(())}: nothing to merge: add a `models:` list or `slices:`")
    for key in ("dtype", "out_dtype"):
        value = data.get(key)
        if value is not None and DTYPES.get(str(value)) is None:
            problems.append(f"{at((key,))}: unknown {key} `{value}`"
                            f"{suggest(str(value), ['float32', 'float16', 'bfloat16'])}")
    if isinstance(slices, list):
        problems += _slice_problems(slices, at)
    problems += _tokenizer_problems(data, at)
    if method is not None:
        problems += _parameter_problems(data, method, at)
        problems += _input_problems(data, method, at)
    return problems


def _tokenizer_problems(data: dict, at) -> list[str]:
    problems = []
    if data.get("tokenizer_source") is not None and data.get("tokenizer") is not None:
        problems.append(f"{at(('tokenizer_source',))}: give either `tokenizer_source` or a `tokenizer:` "
                        "block (its `source:` key), not both")
    template = data.get("chat_template")
    if isinstance(template, str):
        msg = template_problem(template)
        if msg:
            problems.append(f"{at(('chat_template',))}: {msg}")
    return problems


def _slice_problems(slices: list, at) -> list[str]:
    problems = []
    for i, sl in enumerate(slices):
        sources = sl.get("sources") if isinstance(sl, dict) else None
        if not isinstance(sources, list):
            continue
        lengths = []
        for j, src in enumerate(sources):
            rng = src.get("layer_range") if isinstance(src, dict) else None
            if isinstance(rng, list) and len(rng) == 2 and all(isinstance(v, int) for v in rng):
                if rng[0] < 0 or rng[1] <= rng[0]:
                    problems.append(f"{at(('slices', i, 'sources', j, 'layer_range'))}: layer_range "
                                    f"{rng} is empty or negative; write [start, end) with start < end")
                lengths.append(rng[1] - rng[0])
        if len(set(lengths)) > 1:
            problems.append(f"{at(('slices', i, 'sources'))}: the sources of slice {i} have uneven "
                            f"layer counts {lengths}; every source of a slice needs the same number of layers")
    return problems


def _param_blocks(data: dict):
    """Yield (loc, params dict, is_model_level) for every `parameters:` block."""
    if isinstance(data.get("parameters"), dict):
        yield ("parameters",), data["parameters"], False
    for i, m in enumerate(data.get("models") or []):
        if isinstance(m, dict) and isinstance(m.get("parameters"), dict):
            yield ("models", i, "parameters"), m["parameters"], True
    for i, sl in enumerate(data.get("slices") or []):
        if not isinstance(sl, dict):
            continue
        if isinstance(sl.get("parameters"), dict):
            yield ("slices", i, "parameters"), sl["parameters"], False
        for j, src in enumerate(sl.get("sources") or []):
            if isinstance(src, dict) and isinstance(src.get("parameters"), dict):
                yield ("slices", i, "sources", j, "parameters"), src["parameters"], True


def _parameter_problems(data: dict, method: Method, at) -> list[str]:
    problems = []
    names = [p.name for p in method.params]
    for loc, params, model_level in _param_blocks(data):
        for key, setting in params.items():
            param = method.param(str(key))
            if param is None:
                hint = suggest(str(key), names) or (f"; {method.name} takes " + (", ".join(f"`{n}`" for n in names) or "no parameters"))
                problems.append(f"{at(loc + (key,))}: `{key}` is not a parameter of {method.name}{hint}")
                continue
            if model_level and not param.per_model:
                problems.append(f"{at(loc + (key,))}: `{key}` applies to the whole {method.name} merge, "
                                "not to one model; move it to the top-level (or slice) `parameters:`")
            for value, vloc in _leaf_values(setting, loc + (key,)):
                msg = _check_value(param, value)
                if msg:
                    problems.append(f"{at(vloc)}: {msg}")
    return problems


def _leaf_values(setting: Any, loc: tuple):
    if isinstance(setting, dict):
        yield from _leaf_values(setting.get("value"), loc + ("value",))
    elif isinstance(setting, list):
        for i, item in enumerate(setting):
            yield from _leaf_values(item, loc + (i,))
    elif setting is not None:
        yield setting, loc


def _check_value(param, value: Any) -> str | None:
    if param.type is bool:
        if isinstance(value, bool) or value in (0, 1):
            return None
        return f"{param.name} must be true or false, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{param.name} must be a number, got {value!r}"
    if param.type is int and not float(value).is_integer():
        return f"{param.name} must be a whole number, got {value!r}"
    return param.check(value)


def _input_problems(data: dict, method: Method, at) -> list[str]:
    """Base-model rule and input counts, per slice (models: counts as one slice)."""
    problems = []
    top_base = _ref_str(data.get("base_model"))
    groups = []
    if isinstance(data.get("models"), list):
        refs = [_ref_str(m.get("model")) if isinstance(m, dict) else None for m in data["models"]]
        if top_base and top_base not in refs:
            refs.append(top_base)
        groups.append((("models",), refs, top_base))
    elif isinstance(data.get("slices"), list):
        for i, sl in enumerate(data["slices"]):
            if isinstance(sl, dict) and isinstance(sl.get("sources"), list):
                refs = [_ref_str(s.get("model")) if isinstance(s, dict) else None for s in sl["sources"]]
                groups.append((("slices", i, "sources"), refs, _ref_str(sl.get("base_model")) or top_base))
    for loc, refs, base in groups:
        if method.base == "required" and not base:
            problems.append(f"{at(loc)}: {method.name} needs a `base_model`; add `base_model: <model>` "
                            "at the top level")
            continue
        n = len(refs) if method.base == "input" else len([r for r in refs if r != base])
        if n < method.min_inputs:
            problems.append(f"{at(loc)}: {method.name} needs at least {method.min_inputs} "
                            f"{'input' if method.base == 'input' else 'non-base'} model(s), got {n}")
        if method.max_inputs is not None and n > method.max_inputs:
            what = "model(s)" if method.base == "input" else "model(s) besides the base"
            problems.append(f"{at(loc)}: {method.name} takes at most {method.max_inputs} {what}, got {n}")
    return problems


def _ref_str(value: Any) -> str | None:
    try:
        return str(ModelRef.parse(value)) if value is not None else None
    except ValueError:
        return None
