"""karcher: the Karcher (Riemannian) mean of all inputs on the unit hypersphere.

METHODS.md, "karcher": equal weights 1/N over every input (a base is one more point),
iterated tangent steps from the normalised mean, rescaled by the mean input norm.

As passes: the inputs' norms, then the norm of the first mean, then per iteration the dots
of the mean with every unit input, the norm of the tangent and the norm of the stepped mean.
The mean itself is never stored: each pass recomputes it for its chunk by replaying the
earlier iterations elementwise from their (scalar) statistics, with the same roundings as
a whole-tensor loop, so the bytes do not depend on chunking.
"""

from __future__ import annotations

import torch

from mergeflow.methods.base import Method, Param
from mergeflow.methods.passes import Chunk, Meta, Pass, Program, as_tensor, run_whole


def _work(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _total(blocks: list[dict], key) -> float:
    return sum((b[key] for b in blocks[1:]), blocks[0][key]).value()


class _Replay:
    """The elementwise state of one chunk at a given iteration, from the statistics so far."""

    def __init__(self, chunk: Chunk, stats: dict):
        self.chunk, self.stats = chunk, stats
        xs = chunk.xs
        self.units = [torch.zeros_like(x) if float(n) == 0.0 else (x / n.to(x.device)).to(x.dtype)
                      for x, n in zip(xs, stats["norms"])]
        self.valid = [self.units[i] for i in stats["valid"]]

    def first(self) -> torch.Tensor:
        mean = torch.zeros_like(self.valid[0])
        for a, u in zip(self.stats["alphas"], self.valid):
            mean += a * u
        return mean

    def mean(self, k: int) -> torch.Tensor:
        """The normalised mean at the start of iteration k."""
        s, like = self.stats, self.valid[0]
        m = like.clone() if s["init_fallback"] else (self.first() / s["init_norm"].to(like.device)).to(like.dtype)
        for j in range(k):
            m = self.step(m, j)
        return m

    def tangent(self, m: torch.Tensor, k: int) -> torch.Tensor:
        it = self.stats[("iter", k)]
        tangent = torch.zeros_like(m)
        for u, cos, coef in zip(self.valid, it["cos"], it["coef"]):
            if coef is not None:
                tangent += coef.to(m.device) * (u - cos.to(m.device) * m)
        return tangent

    def stepped(self, m: torch.Tensor, k: int) -> torch.Tensor:
        tn = self.stats[("iter", k)]["tn"].to(m.device)
        return (torch.cos(tn) * m + torch.sin(tn) * (self.tangent(m, k) / tn)).to(m.dtype)

    def step(self, m: torch.Tensor, k: int) -> torch.Tensor:
        it = self.stats[("iter", k)]
        m = self.stepped(m, k)
        return (m / it["n"].to(m.device)).to(m.dtype) if it["renorm"] else m


def program(meta: Meta) -> Program:
    """(Σ_i ‖x_i‖ / N) · KarcherMean(x_i / ‖x_i‖); inputs with norm <= tol drop out of the mean."""
    n, dtype, work = meta.inputs, meta.dtype, _work(meta.dtype)
    if n == 1:
        return Program(lambda chunk, stats: chunk.xs[0])
    max_iter, tol = int(meta.params.get("max_iter", 10)), meta.params.get("tol", 1e-5)
    alpha = 1.0 / n

    def norms(chunk, stats):
        return {i: chunk.norms(x.to(work)) for i, x in enumerate(chunk.xs)}

    def norms_done(blocks, stats):
        values = [as_tensor(_total(blocks, i), work) for i in range(n)]
        valid = [i for i, v in enumerate(values) if float(v) > tol]
        total = sum([alpha] * len(valid))
        return {"norms": values, "valid": valid, "alphas": [alpha / total for _ in valid],
                "scale": sum(alpha * v for v in values), "stop": -1 if valid else 0}

    def init(chunk, stats):
        return {"m": chunk.norms(_Replay(chunk, stats).first().to(work))}

    def init_done(blocks, stats):
        value = as_tensor(_total(blocks, "m"), work)
        return {"init_norm": value, "init_fallback": float(value) < tol}

    def running(k):
        return lambda stats: 0 <= stats["stop"] <= k  # stopped before iteration k: nothing to do

    def dots(k):
        def partial(chunk, stats):
            r = _Replay(chunk, stats)
            m = r.mean(k)
            return {i: chunk.sums(m.float() * u.float()) for i, u in enumerate(r.valid)}

        def done(blocks, stats):
            cos, coef = [], []
            for i, a in enumerate(stats["alphas"]):
                c = as_tensor(_total(blocks, i), dtype).clamp(-1.0, 1.0)
                theta = torch.arccos(c)
                cos.append(c)
                coef.append(None if float(theta) < tol else a * (theta / torch.sin(theta)))
            return {("iter", k): {"cos": cos, "coef": coef}}
        return Pass(partial, done, running(k))

    def tangent_norm(k):
        def partial(chunk, stats):
            r = _Replay(chunk, stats)
            return {"t": chunk.norms(r.tangent(r.mean(k), k).to(work))}

        def done(blocks, stats):
            tn = as_tensor(_total(blocks, "t"), work)
            it = dict(stats[("iter", k)], tn=tn)
            return {("iter", k): it, "stop": k if float(tn) < tol else stats["stop"]}
        return Pass(partial, done, running(k))

    def renorm(k):
        def partial(chunk, stats):
            r = _Replay(chunk, stats)
            return {"n": chunk.norms(r.stepped(r.mean(k), k).to(work))}

        def done(blocks, stats):
            value = as_tensor(_total(blocks, "n"), work)
            return {("iter", k): dict(stats[("iter", k)], n=value, renorm=float(value) > tol)}
        return Pass(partial, done, running(k))

    def apply(chunk: Chunk, stats: dict) -> torch.Tensor:
        if not stats["valid"]:
            return torch.zeros_like(chunk.xs[0])
        stop = stats["stop"] if stats["stop"] >= 0 else max_iter
        return stats["scale"] * _Replay(chunk, stats).mean(stop)

    steps = tuple(p for k in range(max_iter) for p in (dots(k), tangent_norm(k), renorm(k)))
    no_valid = lambda stats: not stats["valid"]  # noqa: E731
    return Program(apply, (Pass(norms, norms_done), Pass(init, init_done, no_valid)) + steps, splittable=False)


def karcher(
    xs: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    max_iter: int = 10,
    tol: float = 1e-5,
    weight: list[float | None] | None = None,
) -> torch.Tensor:
    """`weight` is accepted and ignored: every input weighs 1/N (METHODS.md)."""
    return run_whole(program, xs, base, {"max_iter": max_iter, "tol": tol})


METHOD = Method(
    name="karcher",
    kernel=karcher,
    program=program,
    params=(
        Param("max_iter", int, default=10, low=0, doc="maximum number of tangent steps"),
        Param("tol", float, default=1e-5, low=0, doc="convergence tolerance"),
        Param("weight", float, default=None, per_model=True,
              doc="accepted for mergekit configs and ignored: all models weigh 1/N"),
    ),
    base="input",
    min_inputs=1,
    rectify="common",
    doc="Karcher mean on the hypersphere, equal weights over all models (weights ignored). "
        "Deviation: embedding tensors of different sizes are rectified like linear.",
)
