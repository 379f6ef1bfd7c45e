"""The one table of dtypes: YAML names, safetensors codes, torch dtype names, sizes, accumulators.

Nothing here imports torch at module level (the CLI and the planner stay light); the
functions that return torch dtypes import it when called.
"""

from __future__ import annotations

# how a config may spell a dtype (`dtype:`, `out_dtype:`) -> torch dtype name
DTYPES = {
    "float32": "float32", "fp32": "float32", "torch.float32": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16", "torch.float16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16", "torch.bfloat16": "bfloat16",
    "float64": "float64", "torch.float64": "float64",
}
# torch dtype name <-> safetensors code
TORCH_TO_CODE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
                 "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
                 "bool": "BOOL"}
CODE_TO_TORCH = {v: k for k, v in TORCH_TO_CODE.items()}
# bytes per element of each safetensors code
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_CODES = {"F64", "F32", "F16", "BF16"}


def itemsize(dtype: str) -> int:
    """Bytes per element of a torch dtype name (`bfloat16`: 2)."""
    return DTYPE_BYTES[TORCH_TO_CODE[dtype]]


def torch_dtype(name: str):
    """The torch dtype of a torch dtype name or a safetensors code."""
    import torch

    return getattr(torch, CODE_TO_TORCH.get(name, name))


def accumulator_dtype(dtype):
    """float32 for every float dtype except float64, which keeps its own precision."""
    import torch

    return torch.float64 if dtype == torch.float64 else torch.float32
