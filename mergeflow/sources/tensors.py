"""TensorInfo: where one input tensor's bytes are (file, dtype, shape, byte range), and the
LoraDelta a `+adapter` adds to it."""

from __future__ import annotations

from dataclasses import dataclass

from mergeflow.dtypes import DTYPE_BYTES


@dataclass(frozen=True)
class LoraDelta:
    """The adapter tensors for one weight: file, A and B names, scale, layout."""

    file: str
    a: str
    b: str
    scale: float
    embedding: bool = False  # delta = (B @ A).T
    transpose: bool = False  # fan_in_fan_out (GPT-2 Conv1D)


@dataclass(frozen=True)
class TensorInfo:
    """Where one input tensor's bytes are: file, dtype code (safetensors), shape, offsets."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int = 0  # absolute byte offsets in `file` (safetensors only)
    end: int = 0
    lora: LoraDelta | None = None  # a LoRA adapter's change to this weight, applied on load

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES.get(self.dtype, 4)
        for d in self.shape:
            n *= d
        return n
