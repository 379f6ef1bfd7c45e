"""Align embedding and LM-head rows to the output vocabulary (METHODS.md, "Tokenizers and embeddings").

Planning: `align_spec` turns a TokenizerBuild into a VocabAlign for one vocab tensor, plain
data the merge task receives with the raw input tensors (inputs in TensorPlan.all_inputs
order). For every input and output row it says: take this row of yours, take the token's
default row, or take your mean row (padding). A default row is the mean of listed
(input, row) pairs: the `tokens:` entry's source, else the single model that has the
token, else the base if it has it, else every model that has it; no pairs means zeros.
Running: exec/read.py gathers each input's rows by this spec, chunk by chunk, and the merge
method runs on them.
After the merge, `check_output` fails the run unless config.json's vocab_size equals the rows
of every vocab tensor (but those cut by --unsafe-truncate-embeddings) and covers every token
id of the saved tokenizer.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergeflow.errors import MergeflowError
from mergeflow.plan.tokenizer import (
    TokenizerBuild,
    loaded_vocab,
    read_tokenizer_json,
    tokenizer_file,
)
from mergeflow.spec.config import ModelRef, ModelTokenEmbedding, ZeroEmbedding

DEFAULT = -1  # the row is the token's default row
PAD = -2  # the row is padding: the input's mean row over the token rows


@dataclass(frozen=True)
class VocabAlign:
    """How to build each input's aligned matrix for one vocab tensor."""

    rows: int
    maps: tuple[bytes, ...]  # per input, int32: output row -> input row, DEFAULT or PAD
    defaults: tuple[tuple[int, tuple[tuple[int, int], ...]], ...]  # (row, ((input, row), ...))
    sizes: tuple[int, ...] = ()  # rows of each input as stored: alignment needs whole tensors

    def row_map(self, k: int) -> list[int]:
        return array("i", self.maps[k]).tolist()


@dataclass(frozen=True)
class _Ctx:
    build: TokenizerBuild
    tensor: str
    models: list[int]  # plan model index per input
    limits: list[int]  # rows per input
    base: int | None  # plan model index of the base


def align_spec(build: TokenizerBuild, tensor: str, models: list[int], rows: list[int],
               base: int | None) -> tuple[VocabAlign | None, list[str], list[str]]:
    """(spec, problems, warnings) for one vocab tensor whose inputs come from `models`."""
    ctx = _Ctx(build, tensor, models, rows, base)
    maps = [_own_map(ctx, k) for k in range(len(models))]
    problems: list[str] = []
    warnings: list[str] = []
    defaults = []
    inverse = {i: t for t, i in build.vocab.items()}
    for row in sorted({r for m in maps for r, v in enumerate(m) if v == DEFAULT}):
        sources = _default(ctx, inverse[row], problems, warnings)
        defaults.append((row, sources))
    if problems:
        return None, problems, warnings
    packed = tuple(array("i", m).tobytes() for m in maps)  # compact: 4 bytes a row in the graph
    return VocabAlign(build.rows, packed, tuple(defaults), tuple(rows)), problems, warnings


def _own_map(ctx: _Ctx, k: int) -> list[int]:
    """Output row -> input k's row for each token it has (DEFAULT where not, or forced)."""
    key = (ctx.models[k], ctx.limits[k])
    if key not in ctx.build.cache:  # the embedding and the LM head usually share it
        vocab, limit = ctx.build.models[ctx.models[k]], ctx.limits[k]
        forced = {t for t, e in ctx.build.tokens.items() if e.force}
        out = [PAD] * ctx.build.rows
        for tok, i in ctx.build.vocab.items():
            j = vocab.get(tok)
            out[i] = j if j is not None and j < limit and tok not in forced else DEFAULT
        ctx.build.cache[key] = out
    return ctx.build.cache[key]


def _has(ctx: _Ctx, k: int, tok: str) -> int | None:
    j = ctx.build.models[ctx.models[k]].get(tok)
    return j if j is not None and j < ctx.limits[k] else None


def _default(ctx: _Ctx, tok: str, problems: list[str], warnings: list[str]) -> tuple[tuple[int, int], ...]:
    entry = ctx.build.tokens.get(tok)
    if entry is not None and entry.source is not None:
        return _configured(ctx, tok, entry.source, problems)
    owners: dict[int, tuple[int, int]] = {}  # plan model -> (input, row), first input per model
    for k, m in enumerate(ctx.models):
        j = _has(ctx, k, tok)
        if j is not None and m not in owners:
            owners[m] = (k, j)
    if not owners:
        warnings.append(f"token {tok!r} is in no input model's vocabulary; its embedding rows are zeros "
                        "(give it a source under `tokenizer: tokens:`)")
        return ()
    if len(owners) == 1:
        return tuple(owners.values())
    if ctx.base in owners:
        return (owners[ctx.base],)
    return tuple(owners.values())


def _configured(ctx: _Ctx, tok: str, source, problems: list[str]) -> tuple[tuple[int, int], ...]:
    """The row a `tokens:` entry names: zeros, a model's own row of the token, or a model_token."""
    if isinstance(source, ZeroEmbedding):
        return ()
    ref: ModelRef = source.model if isinstance(source, ModelTokenEmbedding) else source
    where = ctx.build.where(("tokenizer", "tokens", tok, "source"))
    m = ctx.build.index.get(str(ref), -1)
    if m < 0:
        problems.append(f"{where}: model {ref} is not one of the merged models")
        return ()
    if m not in ctx.models:
        problems.append(f"{where}: model {ref} does not supply {ctx.tensor} to this merge")
        return ()
    k = ctx.models.index(m)
    if not isinstance(source, ModelTokenEmbedding):
        j = _has(ctx, k, tok)
        if j is None:
            problems.append(f"{where}: model {ref} has no token {tok!r}; use `{{kind: model_token, "
                            f"model: {ref}, token: ...}}` to take another token's row")
        return () if j is None else ((k, j),)
    j = source.token_id if source.token_id is not None else ctx.build.full[m].get(source.token)
    if j is None or j >= ctx.limits[k]:
        what = f"token id {j}" if source.token is None else f"token {source.token!r}"
        problems.append(f"{where}: model {ref} has no {what} in {ctx.tensor} "
                        f"({ctx.limits[k]} rows)")
        return ()
    return ((k, j),)


def saved_max_id(out_dir: Path) -> int | None:
    """The largest token id of the tokenizer saved in out_dir (None: no tokenizer there)."""
    data = read_tokenizer_json(out_dir)
    if data is None:
        return None
    vocab = loaded_vocab(data, tokenizer_file(out_dir))
    return max(vocab.values()) if vocab else None


def check_output(out_dir: Path, config: dict[str, Any], vocab_rows: dict[str, int],
                 truncated: tuple[str, ...] = ()) -> None:
    """config vocab_size == rows of every vocab tensor, and > every saved token id. `truncated`
    (MergePlan.truncated) were cut by --unsafe-truncate-embeddings, whose config.json keeps the
    donor's vocab_size as mergekit's does: their rows are not held to it."""
    size = config.get("vocab_size")
    if not isinstance(size, int):
        return
    problems = [f"{name} has {rows} rows" for name, rows in vocab_rows.items()
                if rows != size and name not in truncated]
    max_id = saved_max_id(out_dir)
    if max_id is not None and max_id >= size:
        problems.append(f"the saved tokenizer has token ids up to {max_id}")
    if problems:
        raise MergeflowError(
            f"{out_dir}: the merged model's vocabulary is inconsistent, so config.json was not "
            f"written: config vocab_size is {size} but {'; '.join(problems)}. Set "
            "`tokenizer_source: union` (or base, or a model) so embeddings follow one tokenizer")
