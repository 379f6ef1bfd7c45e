"""Read a mergekit-moe config (the YAML `mergekit-moe` takes, unchanged) into a frozen model.

`load_moe_config(path)` parses the YAML, checks it against mergekit-moe's schema and rules,
and reports every problem at once, each located as `file:line:col`. mergekit-moe ignores keys
it does not know; so does mergeflow, with a warning (and a did-you-mean) for each. The rules
that need the models or the command line (output architecture, identical experts) are checked
when planning (plan/moe.py). Nothing here reads a tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergeflow.dtypes import DTYPES
from mergeflow.errors import ConfigError
from mergeflow.spec.config import Ref, suggest
from mergeflow.spec.reader import line_key, locate, parse_yaml, read_text

# `hidden`: each layer's input hidden state at the last prompt token; `hidden_avg`: averaged
# over the prompt; `hidden_last`: as `hidden`; `cheap_embed`: the prompts' token embeddings,
# the same for every layer; `random`: N(0, 1); `uniform_random`: torch.nn.Linear's init.
GATE_MODES = ("hidden", "cheap_embed", "random", "uniform_random", "hidden_avg", "hidden_last")
HIDDEN_MODES = ("hidden", "hidden_avg", "hidden_last")
RANDOM_MODES = ("random", "uniform_random")


class _Lenient(BaseModel):
    # mergekit-moe's models ignore unknown keys; they are reported as warnings instead
    model_config = ConfigDict(extra="ignore", frozen=True, arbitrary_types_allowed=True)


class Expert(_Lenient):
    """One dense model whose MLPs become one expert of every layer."""

    source_model: Ref
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None  # gaussian noise added to this expert's MLP weights
    residual_scale: float | None = None  # multiplies its down_proj (the residual branch)

    def prompts(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return tuple(self.positive_prompts or ()), tuple(self.negative_prompts or ())


class MoEConfig(_Lenient):
    """A whole mergekit-moe config. `path`, `text`, `positions`, `warnings`: set by the loader."""

    base_model: Ref
    experts: list[Expert]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[Expert] | None = None
    architecture: str | None = None
    path: str = "<config>"
    text: str = ""
    positions: dict[tuple, tuple[int, int]] = Field(default_factory=dict, repr=False)
    warnings: tuple[str, ...] = ()

    def where(self, loc: tuple) -> str:
        """`file:line:col` of the YAML node at `loc` (or of its nearest located parent)."""
        return locate(self.path, self.positions, loc)

    def model_refs(self) -> list[tuple[tuple, Any]]:
        """(YAML location, ref) of every model: the base, the experts, the shared experts."""
        refs = [(("base_model",), self.base_model)]
        refs += [(("experts", i, "source_model"), e.source_model) for i, e in enumerate(self.experts)]
        refs += [(("shared_experts", i, "source_model"), e.source_model)
                 for i, e in enumerate(self.shared_experts or [])]
        return refs


_RESERVED = ("path", "text", "positions", "warnings")
_FIELDS = {"": [f for f in MoEConfig.model_fields if f not in _RESERVED], "expert": list(Expert.model_fields)}


def load_moe_config(path: str | Path) -> MoEConfig:
    path = Path(path)
    return parse_moe_config(read_text(path), str(path))


def parse_moe_config(text: str, path: str = "<config>") -> MoEConfig:
    """Parse and validate mergekit-moe config text; raise ConfigError listing every problem."""
    data, positions, duplicates = parse_yaml(text, path)  # bounded; duplicate keys are problems
    if not isinstance(data, dict):
        raise ConfigError(path, [f"{path}:1:1: a mergekit-moe config is a YAML mapping with "
                                 "`base_model` and `experts`"])
    at = lambda loc: locate(path, positions, loc)  # noqa: E731
    clean = {k: v for k, v in data.items() if k not in _RESERVED}
    problems = duplicates + [f"{at((k,))}: unknown key `{k}`" for k in _RESERVED if k in data]
    try:
        MoEConfig(**clean)
    except ValidationError as e:
        problems += [_format_error(err, at) for err in e.errors()]
    problems += moe_problems(clean, at)
    unknown = _unknown_keys(clean, at)
    if problems:  # a misspelt key often explains a problem (`gate_mod: random`): both are listed
        raise ConfigError(path, sorted(dict.fromkeys(problems + unknown), key=line_key))
    return MoEConfig(**clean, path=path, text=text, positions=positions, warnings=tuple(unknown))


def _format_error(err: dict, at) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    dotted = ".".join(str(p) for p in loc) or "config"
    if err["type"] == "missing":
        return f"{at(loc)}: `{dotted}` is required"
    return f"{at(loc)}: `{dotted}`: {err['msg'].removeprefix('Value error, ')}"


def _unknown_keys(data: dict, at) -> list[str]:
    """A warning per key mergekit-moe would silently ignore."""
    found = [((k,), _FIELDS[""]) for k in data if k not in _FIELDS[""]]
    for group in ("experts", "shared_experts"):
        for i, e in enumerate(data.get(group) or []):
            if isinstance(e, dict):
                found += [((group, i, k), _FIELDS["expert"]) for k in e if k not in _FIELDS["expert"]]
    return [f"{at(loc)}: unknown key `{loc[-1]}`{suggest(str(loc[-1]), fields)}; mergekit-moe ignores "
            "it, and so does mergeflow" for loc, fields in found]


def moe_problems(data: dict, at) -> list[str]:
    """mergekit-moe's own rules on a config (those that need no model)."""
    problems = []
    mode = data.get("gate_mode", "hidden")
    if isinstance(mode, str) and mode not in GATE_MODES:
        problems.append(f"{at(('gate_mode',))}: unknown gate_mode `{mode}`{suggest(mode, GATE_MODES)}; "
                        f"use one of {', '.join(GATE_MODES[:4])}")
    dtype = data.get("dtype")
    if dtype is not None and DTYPES.get(str(dtype)) is None:
        problems.append(f"{at(('dtype',))}: unknown dtype `{dtype}`"
                        f"{suggest(str(dtype), ['float32', 'float16', 'bfloat16'])}")
    experts = [e for e in data.get("experts") or [] if isinstance(e, dict)]
    per_token = data.get("experts_per_token", 2)
    if isinstance(per_token, int) and per_token < 1:
        problems.append(f"{at(('experts_per_token',))}: experts_per_token must be at least 1")
    elif isinstance(per_token, int) and isinstance(data.get("experts"), list) and len(data["experts"]) < per_token:
        problems.append(f"{at(('experts',))}: {len(data['experts'])} expert(s) but experts_per_token is "
                        f"{per_token}; list at least as many experts as each token is routed to")
    if mode in GATE_MODES and mode != "random":
        problems += _prompt_problems(experts, mode, at)
    shared = [e for e in data.get("shared_experts") or [] if isinstance(e, dict)]
    if len({bool(e.get("positive_prompts")) for e in shared}) > 1:
        problems.append(f"{at(('shared_experts',))}: give `positive_prompts` to every shared expert "
                        "or to none")
    return problems


def _prompt_problems(experts: list[dict], mode: str, at) -> list[str]:
    """Every expert needs positive prompts (mergekit-moe asks for them with every gate_mode but
    `random`), and the experts' prompts must not all be the same."""
    problems = [f"{at(('experts', i))}: expert {i} has no `positive_prompts`; with gate_mode {mode} "
                "each expert needs prompts of what should be routed to it (only gate_mode random "
                "needs none)" for i, e in enumerate(experts) if not e.get("positive_prompts")]
    prompts = [(tuple(map(str, e.get("positive_prompts") or ())), tuple(map(str, e.get("negative_prompts") or ())))
               for e in experts]
    if not problems and prompts and all(p == prompts[0] for p in prompts[1:]):
        problems.append(f"{at(('experts',))}: the positive and negative prompts are the same for every "
                        "expert, which cannot give a working router; give each expert prompts of what "
                        "should be routed to it")
    return problems
