"""arcee_fusion: take the other model's change only where it is unusually important.

METHODS.md, "arcee_fusion": importance = |x - b| · KL(softmax(x) ‖ softmax(b)) per row;
entries with importance >= median + 1.5 IQR take x, the rest keep b.
"""

from __future__ import annotations

import torch

from mergeflow.methods.base import Method

QUANTILE_SAMPLE_SIZE = 1_000_000
SOFTMAX_EPS = 1e-8


def importance(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|x - b| times the KL divergence of the rows' softmaxes (along the last dim)."""
    p = torch.softmax(x, dim=-1) + SOFTMAX_EPS
    q = torch.softmax(base, dim=-1) + SOFTMAX_EPS
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (x - base).abs() * kl


def quantiles(values: torch.Tensor, qs: tuple[float, ...], generator: torch.Generator | None):
    """sorted[floor(q (n-1))] over all entries, or over 1e6 entries drawn with replacement
    (on the CPU generator) when there are more."""
    flat = values.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE_SIZE:
        if generator is None:
            raise ValueError("arcee_fusion needs a random generator for tensors over 1e6 entries")
        picks = torch.randint(flat.numel(), (QUANTILE_SAMPLE_SIZE,), generator=generator)
        flat = flat[picks.to(flat.device)]
    ordered = torch.sort(flat).values
    return [ordered[int(q * (ordered.numel() - 1))] for q in qs]


def arcee_fusion(
    xs: list[torch.Tensor], base: torch.Tensor, *, generators: list[torch.Generator] | None = None
) -> torch.Tensor:
    """r = b + (x - b) · [I >= median + 1.5 (Q3 - Q1)], in the compute dtype (deviation:
    mergekit's result is float32 whatever the dtype; the values agree after rounding)."""
    if len(xs) != 1:
        raise ValueError(f"arcee_fusion needs a base and exactly one other model, got {len(xs)} others")
    x = xs[0]
    scores = importance(x, base)
    q1, median, q3 = quantiles(scores, (0.25, 0.5, 0.75), generators[0] if generators else None)
    threshold = median + 1.5 * (q3 - q1)
    return base + (x - base) * (scores >= threshold)


METHOD = Method(
    name="arcee_fusion",
    kernel=arcee_fusion,
    params=(),
    base="required",
    min_inputs=1,
    max_inputs=1,
    rectify="common",
    random=True,
    doc="Arcee Fusion: keep the other model's changes whose KL-weighted size is an outlier. "
        "Tensors over 1e6 entries estimate the quantiles from a seeded sample. "
        "Deviation: the result is in the compute dtype, not float32.",
)
