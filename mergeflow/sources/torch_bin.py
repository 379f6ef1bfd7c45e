"""PyTorch `.bin` checkpoints: names, dtypes and shapes, loaded weights-only.

Only `torch.load(weights_only=True)` ever reads them (mmapped when the file is a zip
checkpoint), so a pickle that would run code is refused, never unpickled.
"""

from __future__ import annotations

import re
import zipfile
from functools import lru_cache
from pathlib import Path

from mergeflow.dtypes import TORCH_TO_CODE
from mergeflow.errors import MergeflowError
from mergeflow.sources.files import open_regular
from mergeflow.sources.tensors import TensorInfo


def read_bin_header(file: Path) -> dict[str, TensorInfo]:
    state = _load_bin(str(file))
    out = {}
    for name, t in state.items():
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in TORCH_TO_CODE:
            raise MergeflowError(f"{file}: tensor {name} has dtype {dtype}, which mergeflow cannot read "
                                 f"(it reads {', '.join(sorted(TORCH_TO_CODE))})")
        out[name] = TensorInfo(name, str(file), TORCH_TO_CODE[dtype], tuple(t.shape))
    return out


@lru_cache(maxsize=8)
def _load_bin(file: str) -> dict:
    import os

    import torch

    os.close(open_regular(Path(file), "weights file")[0])  # a FIFO would block torch.load forever
    try:  # legacy (pre-zip) checkpoints cannot be mmapped; weights_only reads them all the same
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as e:  # noqa: BLE001 (whatever a damaged or hostile file makes torch.load raise)
        raise MergeflowError(f"{file}: not a weights-only PyTorch checkpoint, refused ({_reason(e)}); "
                             "mergeflow never unpickles arbitrary code: convert it to safetensors") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise MergeflowError(f"{file}: not a state dict of tensors")
    return state


def _reason(e: Exception) -> str:
    """The telling line of torch.load's long message (the refused global), without its advice
    to load with weights_only=False."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", x).strip() for x in str(e).splitlines() if x.strip()]
    telling = [x for x in lines if "GLOBAL" in x or "Unsupported" in x] or lines or [type(e).__name__]
    return telling[0].removeprefix("WeightsUnpickler error: ").split(". Please use")[0].rstrip(".")
