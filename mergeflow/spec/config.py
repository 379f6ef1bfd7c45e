"""Read a merge config (the mergekit YAML format, unchanged) into frozen, validated models.

`load_config` takes a path, a YAML string or a dict. The YAML is bounded and parsed with
positions (reader.py), unknown keys and numbers written as strings are settled (keys.py),
the data is checked against a strict schema (here) and against the chosen method
(checks.py, parameters.py). Every problem is reported at once, each located as
`file:line:col`, with a did-you-mean where a name is close; what mergekit 0.1.5 silently
ignores is accepted with a warning (`MergeConfig.warnings`, carried into the plan).
Nothing here reads a tensor.
"""

from __future__ import annotations

import os
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

from mergeflow.errors import ConfigError
from mergeflow.methods import REGISTRY, Method
from mergeflow.spec.reader import Positions, line_key, locate, parse_yaml, read_text
from mergeflow.spec.refs import ModelRef

__all__ = ["Conditional", "InputModel", "InputSlice", "MergeConfig", "ModelRef", "ModelTokenEmbedding",
           "OutputModule", "OutputSlice", "TokenEmbedding", "TokenizerConfig", "ZeroEmbedding",
           "load_config", "locate", "parse_config", "suggest"]


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
    residual_weight: float | None = None  # mergekit reads it and never uses it (a warning says so)
    parameters: Params | None = None


class OutputModule(Strict):
    """One module of a multi-module model (`modules: {text_decoder: ..., vision_tower: ...}`):
    its own `models:` or `slices:` and parameters, merged with the config's merge_method."""

    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
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


INTERNAL = ("path", "text", "positions", "warnings")  # filled by load_config, never read from YAML


class MergeConfig(Strict):
    """A whole merge config. `path`, `text`, `positions` and `warnings` are filled by load_config."""

    merge_method: str
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    modules: dict[str, OutputModule] | None = None
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
    warnings: tuple[str, ...] = ()

    @property
    def method(self) -> Method:
        return REGISTRY[self.merge_method]

    def where(self, loc: tuple) -> str:
        """`file:line:col` of the YAML node at `loc` (or of its nearest located parent)."""
        return locate(self.path, self.positions, loc)


def suggest(name: str, options: list[str] | tuple[str, ...]) -> str:
    """` (did you mean `x`?)` for the closest option, or an empty string."""
    import difflib

    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def load_config(source: str | os.PathLike | dict) -> MergeConfig:
    """Read a merge config: a path to a YAML file, YAML text, or an already-parsed dict.

    The format is mergekit's, read unchanged. A `str` is YAML text when it spans several
    lines or does not name an existing file (`load_config("merge_method: linear\\nmodels: ...")`);
    otherwise it is a path, like a `Path`. Returns a frozen MergeConfig whose `warnings`
    list what is accepted but ignored, each as `file:line:col: ...` (plan_merge carries them
    into `MergePlan.warnings`). Raises ConfigError (a MergeflowError) listing every problem
    at once, each with its location and, for misspelt names, a did-you-mean.
    """
    if isinstance(source, dict):
        text = yaml.safe_dump(source, sort_keys=False)
        return config_from_data(source, "<dict>", text, {})
    if isinstance(source, str) and _is_yaml_text(source):
        return parse_config(source, "<string>")
    path = Path(source)
    return parse_config(read_text(path), str(path))


def _is_yaml_text(source: str) -> bool:
    if "\n" in source or source.lstrip().startswith("{"):
        return True
    return not (source.endswith((".yml", ".yaml")) or Path(source).exists())


def parse_config(text: str, path: str = "<config>", *, ignore: tuple[str, ...] = ()) -> MergeConfig:
    """Parse and validate config text; raise ConfigError listing every problem. Top-level keys
    in `ignore` are left out (a multi-stage file's `name:`, spec/multi.py)."""
    data, positions, problems = parse_yaml(text, path)
    if isinstance(data, dict) and ignore:
        data = {k: v for k, v in data.items() if k not in ignore}
    return config_from_data(data, path, text, positions, problems)


def config_from_data(data: Any, path: str, text: str, positions: Positions,
                     problems: list[str] | None = None) -> MergeConfig:
    """Validate parsed data: every problem at once (ConfigError), warnings kept on the result."""
    from mergeflow.spec.checks import Findings, semantic_problems
    from mergeflow.spec.keys import settle, used_parameters

    if not isinstance(data, dict):
        raise ConfigError(path, [f"{locate(path, positions, ())}: a merge config is a YAML mapping with "
                                 "`merge_method` and `models:`, `slices:` or `modules:`"])
    found = Findings(path, positions, list(problems or []))
    clean = settle(data, found)
    semantic_problems(clean, found)  # warns about (or refuses) parameters the method does not use
    clean = used_parameters(clean)
    found.problems += _schema_problems(clean, found)
    if found.problems:
        raise ConfigError(path, sorted(dict.fromkeys(found.problems), key=line_key))
    return MergeConfig(**clean, path=path, text=text, positions=positions, warnings=tuple(found.warnings()))


def _schema_problems(data: dict, found) -> list[str]:
    try:
        MergeConfig(**data)
    except ValidationError as e:
        return [_format_error(err, found) for err in _collapse_union(e.errors())]
    return []


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
        loc = _module_loc(err["loc"], loc)
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


def _module_loc(raw: tuple, loc: tuple) -> tuple:
    """Keep a module's name in the location even when it looks like a union tag."""
    if len(raw) > 1 and raw[0] == "modules" and (len(loc) < 2 or loc[1] != raw[1]):
        return ("modules", raw[1], *loc[1:])
    return loc


PARAM_VALUE_HELP = ("a parameter value is a number, a list of numbers (a gradient), or a list "
                    "of `{filter: <substring>, value: <number or gradient>}` entries")


def _is_union_tag(part: str) -> bool:
    return any(c in part for c in "[]()") or part in {
        "bool", "int", "float", "str", "Conditional", "ModelRef", "ModelTokenEmbedding",
        "ZeroEmbedding", "function-before", "literal['union','base']", "dict",
    } or part.startswith(("function-", "literal[", "json-or-python"))


def _format_error(err: dict, found) -> str:
    loc = err["loc"]
    where = found.at(loc)
    dotted = ".".join(str(p) for p in loc) or "config"
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key `{loc[-1]}`"
    if err["type"] == "missing":
        return f"{where}: `{dotted}` is required"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: `{dotted}`: {msg}"
