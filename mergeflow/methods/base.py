"""What a merge method declares: its parameters, its base-model rule, its program, its kernel.

`program(meta)` compiles the method for one tensor into reduction passes and an apply over
row chunks (methods/passes.py); the engine runs it over chunks read from the files. The
kernel is the same program run on whole in-memory tensors, a pure function: tensors in,
tensor out, keyword-only parameters, no I/O and no config objects. It is called as

    kernel(xs, base, **params)                # deterministic methods
    kernel(xs, base, **params, keys=(...))    # Method.random: one stream key per entry of xs

- `xs`: the input tensors in config order. For `base="input"` methods the base model, if
  any, is one of them (at its config position) and `base` is None; otherwise `xs` are the
  non-base models and `base` is the base tensor (or None where the base is optional).
- per-model parameters (`Param.per_model`) arrive as lists aligned with `xs`; method-wide
  ones as plain Python scalars. All values are already resolved for this tensor (gradients
  and filters applied) and validated against the declarations here.
- All tensors share one dtype (the compute dtype) and one device; the kernel returns a
  tensor of the input shape. The engine casts the result to the output dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from mergeflow.methods.passes import Meta, Program

BaseRule = Literal["required", "optional", "input"]


@dataclass(frozen=True)
class Param:
    """One parameter as written in YAML (`weight`, `density`, `t`, ...)."""

    name: str
    type: type = float  # float | int | bool
    default: Any = None
    required: bool = False
    per_model: bool = False  # True: may differ per model; False: one value for the method
    low: float | None = None  # inclusive bounds, checked on every resolved value
    high: float | None = None
    low_open: bool = False  # True: the bound `low` itself is excluded
    high_open: bool = False
    doc: str = ""

    def check(self, value: Any) -> str | None:
        """Return an error message for an out-of-range value, or None."""
        if self.type is bool:
            return None
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            op = ">" if self.low_open else ">="
            return f"{self.name} must be {op} {self.low}, got {value}"
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            op = "<" if self.high_open else "<="
            return f"{self.name} must be {op} {self.high}, got {value}"
        return None


@dataclass(frozen=True)
class Method:
    """A merge method: the registry entry for one `merge_method:` name."""

    name: str
    kernel: Callable[..., Any]  # the program on whole tensors (see the module doc)
    program: Callable[[Meta], Program]
    params: tuple[Param, ...] = ()
    base: BaseRule = "input"
    min_inputs: int = 1  # counted over xs (see module docstring)
    max_inputs: int | None = None
    rectify: Literal["common", "base"] = "common"  # embedding shape rule (METHODS.md)
    random: bool = False  # draws counter-based random values: the kernel takes `keys`
    # cross-parameter check on one model's resolved values: returns an error message or None
    check: Callable[[dict[str, Any]], str | None] | None = None
    doc: str = ""
    preset: dict[str, Any] = field(default_factory=dict)  # fixed kernel keywords (presets)

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None
