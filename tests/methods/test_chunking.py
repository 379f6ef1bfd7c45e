"""Every method gives the same bytes at any chunking: one row, an odd number of rows, the whole
tensor; float32 and bfloat16; tensors of several segments (passes.SEGMENT elements each)."""

from __future__ import annotations

import pytest
import torch

from mergeflow.methods import REGISTRY
from mergeflow.methods.draws import stream_keys
from mergeflow.methods.passes import SEGMENT, run_whole

ROWS, COLS = 700, 48  # 33,600 elements: two segments of 682 and 18 rows
assert ROWS * COLS > SEGMENT

PARAMS = {  # per method: non-default parameters (per-model values given for 3 models)
    "linear": {"weight": [0.5, 0.3, 0.2]},
    "slerp": {"t": 0.3},
    "nuslerp": {"weight": [0.4, 0.6]},
    "multislerp": {"weight": [0.5, 0.3, 0.2]},
    "karcher": {"max_iter": 4},
    "task_arithmetic": {"weight": [0.5, 0.3, 0.2]},
    "ties": {"weight": [0.5, 0.3, 0.2], "density": [0.4, 0.5, 0.6]},
    "dare_ties": {"weight": [0.5, 0.3, 0.2], "density": [0.4, 0.5, 0.6]},
    "dare_linear": {"weight": [0.5, 0.3, 0.2], "density": [0.4, 0.5, 0.6]},
    "breadcrumbs": {"weight": [0.5, 0.3, 0.2], "density": [0.4, 0.5, 0.6], "gamma": [0.05] * 3},
    "breadcrumbs_ties": {"weight": [0.5, 0.3, 0.2], "density": [0.4, 0.5, 0.6], "gamma": [0.05] * 3},
    "della": {"weight": [0.5, 0.3, 0.2], "density": [0.4, 0.5, 0.6], "epsilon": [0.1] * 3},
    "della_linear": {"weight": [0.5, 0.3, 0.2], "density": [0.4, 0.5, 0.6], "epsilon": [0.1] * 3},
    "sce": {"select_topk": 0.5},
    "ram": {}, "ramplus_tl": {},
    "model_stock": {},
    "nearswap": {"t": 0.01},
    "arcee_fusion": {},
    "passthrough": {"scale": [0.9]},
}
INPUTS = {"slerp": 1, "nuslerp": 2, "nearswap": 1, "arcee_fusion": 1, "passthrough": 1}
VARIANTS = [("nuslerp", {"nuslerp_flatten": False}), ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
            ("model_stock", {"filter_wise": True}), ("ties", {"rescale": True}), ("sce", {"select_topk": 1.0})]


def inputs(name: str, dtype: torch.dtype, shape=(ROWS, COLS)):
    g = torch.Generator().manual_seed(len(name))
    base = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    # coarse deltas: many ties at every top-k cut
    xs = [base + (torch.randint(-6, 7, shape, generator=g) * 0.002).to(dtype) for _ in range(INPUTS.get(name, 3))]
    return xs, (None if REGISTRY[name].base == "input" else base)


def merged(name: str, extra: dict, dtype: torch.dtype, chunk_elements: int | None, shape=(ROWS, COLS)):
    m = REGISTRY[name]
    xs, base = inputs(name, dtype, shape)
    params = dict(m.preset)
    for p in m.params:
        params[p.name] = [p.default] * len(xs) if p.per_model and not p.required else p.default
    params |= PARAMS[name] | extra
    keys = stream_keys(7, "t", len(xs)) if m.random else ()
    return run_whole(m.program, xs, base, params, keys=keys, chunk_elements=chunk_elements)


CASES = [(n, {}) for n in sorted(REGISTRY)] + VARIANTS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name,extra", CASES, ids=[f"{n}{'-' + '-'.join(e) if e else ''}" for n, e in CASES])
def test_any_chunking_gives_the_whole_tensors_bytes(name, extra, dtype):
    whole = merged(name, extra, dtype, None)
    assert whole.shape == (ROWS, COLS) and bool(torch.isfinite(whole).all())
    for rows in (1, 7):
        assert torch.equal(merged(name, extra, dtype, rows * COLS), whole), f"{rows}-row chunks"


@pytest.mark.parametrize("name", ["ties", "della", "model_stock", "arcee_fusion", "nuslerp", "slerp"])
@pytest.mark.parametrize("shape", [(40000,), (9, 5, 800)], ids=["1d", "3d"])
def test_other_ranks_chunk_alike(name, shape):
    whole = merged(name, {}, torch.bfloat16, None, shape)
    assert torch.equal(merged(name, {}, torch.bfloat16, 3 * 5 * 800 if len(shape) == 3 else 999, shape), whole)
