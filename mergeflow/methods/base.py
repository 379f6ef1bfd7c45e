"""What a merge method declares: its parameters, its base-model rule, its kernel.

A kernel is a pure function: tensors in, tensor out, keyword-only parameters, no I/O and
no config objects. It is called as

    kernel(xs, base, **params)                      # deterministic methods
    kernel(xs, base, **params, generators=[...])    # Method.random: one per entry of xs

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
    kernel: Callable[..., Any]
    params: tuple[Param, ...] = ()
    base: BaseRule = "input"
    min_inputs: int = 1  # counted over xs (see module docstring)
    max_inputs: int | None = None
    rectify: Literal["common", "base"] = "common"  # embedding shape rule (METHODS.md)
    random: bool = False
    # True: the kernel works row by row (elementwise, or along rows of dim 0 only), so its
    # tensors are streamed (memory.streams): merged a block of rows at a time, each a separate
    # call on the same rows of every input, with byte-identical results. False (the default)
    # for anything using whole-tensor statistics (top-k, norms, quantiles, L1 rescale) or
    # randomness.
    row_separable: bool = False
    # cross-parameter check on one model's resolved values: returns an error message or None
    check: Callable[[dict[str, Any]], str | None] | None = None
    doc: str = ""
    preset: dict[str, Any] = field(default_factory=dict)  # fixed kernel keywords (presets)

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None
