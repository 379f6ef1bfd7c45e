"""Counter-based random draws: element j of (tensor, model) gets a value that depends only on
(seed, tensor name, model index, j).

Each (seed, tensor, model) names a PCG64 stream (numpy); element j's uniform float32 is the
stream's j-th float32 draw, reached with PCG64.advance (each 64-bit output holds two float32
draws). So any chunk of a tensor draws its own elements alone, and the bytes do not depend on
chunking, scheduling, worker count or device (draws are made on the CPU and moved).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch


def stream_key(seed: int, tensor: str, model: int) -> int:
    """The stream of (run seed, output tensor name, model index), as a 63-bit integer."""
    digest = hashlib.sha256(f"{seed}\0{tensor}\0{model}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def stream_keys(seed: int, tensor: str, count: int) -> tuple[int, ...]:
    return tuple(stream_key(seed, tensor, i) for i in range(count))


def uniform(key: int, start: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Draws start, start+1, ... of stream `key` as a float32 tensor of `shape` (CPU)."""
    n = math.prod(shape)
    bits = np.random.PCG64(key)
    bits.advance(start // 2)
    gen = np.random.Generator(bits)
    if start % 2:  # the first float32 of that 64-bit output belongs to element start - 1
        gen.random(1, dtype=np.float32)
    out = np.empty(n, dtype=np.float32)
    if n:
        gen.random(out=out, dtype=np.float32)
    return torch.from_numpy(out).reshape(shape)
