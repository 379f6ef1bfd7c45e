"""Turn a config and the input headers into a MergePlan: pure data, no dask, no tensor bytes.

One TensorPlan per output tensor (its inputs, method, resolved parameters, dtypes, shape and
byte range in its output shard) and one ShardPlan per output file (its safetensors header,
written before any tensor). `models:` merges every tensor; `slices:` stacks layer ranges
(frankenmerges): embeddings come from the first slice, final norm and LM head from the last.
Every problem found is reported at once, before any tensor is read. Every tensor of the
layout is planned (merged, copied, or taken from the base) or the plan fails: none is
silently dropped. Shape rules (mergekit 0.1.5): inputs of one tensor have one shape; vocab
tensors (dim 0 indexed by token) of different row counts are aligned by token with a
tokenizer setting, cut to the fewest rows with `unsafe_truncate_embeddings`, else refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from mergeflow import __version__
from mergeflow.dtypes import CODE_TO_TORCH, DTYPES, FLOAT_CODES, TORCH_TO_CODE
from mergeflow.errors import MergeflowError
from mergeflow.plan.inputs import Src, buffer_problem, same_shape
from mergeflow.plan.params import check_values, filter_warnings, resolve_all
from mergeflow.plan.shards import ShardPlan, plan_shards
from mergeflow.plan.tokenizer import (
    TokenizerBuild,
    TokenizerPlan,
    plan_tokenizer,
    remap_special_ids,
)
from mergeflow.plan.vocab import VocabAlign, align_spec
from mergeflow.sources import architectures as arch
from mergeflow.sources.models import ModelInfo, TensorInfo, read_model
from mergeflow.spec.config import MergeConfig, ModelRef


@dataclass(frozen=True)
class Stage:
    """An input tensor that an earlier stage of a multi-stage merge produces in the graph
    (never read from a file): that stage's name, plan and output tensor."""

    name: str
    plan: MergePlan
    tensor: TensorPlan


@dataclass(frozen=True)
class Input:
    """One input of one output tensor: which model, which stored tensor, how to cut it."""

    model: int  # index into MergePlan.models
    tensor: TensorInfo
    crop: tuple[int, ...] | None = None  # keep [:crop[0], :crop[1], ...] (rectification)
    stage: Stage | None = None  # produced by an earlier stage instead of stored (tensor: its header)


@dataclass(frozen=True)
class TensorPlan:
    name: str
    method: str
    inputs: tuple[Input, ...]  # xs, in config order (see methods/base.py)
    base: Input | None
    params: tuple[tuple[str, Any], ...]  # resolved; per-model values are tuples aligned with inputs
    compute_dtype: str | None  # torch dtype name, or None: inputs keep their own
    out_dtype: str  # torch dtype name
    shape: tuple[int, ...]
    shard: int = 0
    begin: int = 0  # absolute byte range in the shard file
    end: int = 0
    vocab: VocabAlign | None = None  # vocab tensors with a tokenizer setting: rows to align

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    def all_inputs(self) -> tuple[Input, ...]:
        return self.inputs + ((self.base,) if self.base else ())


@dataclass(frozen=True)
class MergePlan:
    config: MergeConfig
    models: tuple[ModelInfo, ...]
    reference: int  # the model whose config.json and tokenizer the output starts from
    tensors: tuple[TensorPlan, ...]
    shards: tuple[ShardPlan, ...]
    out_config: dict[str, Any]
    seed: int = 0
    warnings: tuple[str, ...] = ()
    fingerprint: str = ""
    tokenizer: TokenizerPlan | None = None  # the output tokenizer's files (None: copy the reference's)
    truncated: tuple[str, ...] = ()  # vocab tensors cut by unsafe_truncate_embeddings (rows != vocab_size)

    @property
    def bytes_read(self) -> int:
        return sum(i.tensor.nbytes for t in self.tensors for i in t.all_inputs())

    @property
    def bytes_written(self) -> int:
        return sum(s.size for s in self.shards)


@dataclass
class _Slice:
    sources: list[tuple[int, int, dict | None, tuple]]  # (model, first layer, params, yaml loc)
    layers: int
    base: int | None
    params: dict | None
    loc: tuple
    module_params: dict | None = None  # `modules: {name: {parameters}}`, between slice and top level


@dataclass
class _Planner:
    config: MergeConfig
    models: list[ModelInfo] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    reported: set[tuple] = field(default_factory=set)
    vocab: TokenizerBuild | None = None  # set with `tokenizer_source` / `tokenizer:`
    truncate: bool = False  # unsafe_truncate_embeddings
    truncated: list[str] = field(default_factory=list)
    known: Mapping[str, ModelInfo] = field(default_factory=dict)  # references not read from disk

    def label(self, model: int) -> str:
        return self.models[model].label

    def model(self, ref: ModelRef, loc: tuple, allow_download: bool) -> int | None:
        key = str(ref)
        if key not in self.index:
            try:
                known = self.known.get(key)
                self.models.append(known if known is not None else read_model(ref, allow_download=allow_download))
            except MergeflowError as e:
                self.problems.append(f"{self.config.where(loc)}: {e}")
                self.index[key] = -1
                return None
            self.index[key] = len(self.models) - 1
        return self.index[key] if self.index[key] >= 0 else None


def plan_merge(config: MergeConfig, *, out_shard_size: int = 5_000_000_000, random_seed: int = 0,
               allow_crimes: bool = False, allow_download: bool = True,
               trust_remote_code: bool = False, unsafe_truncate_embeddings: bool = False,
               models: Mapping[str, ModelInfo] | None = None) -> MergePlan:
    """Plan the merge of `config` (from load_config) from the input headers alone: no tensor
    is read. Returns a MergePlan: every output tensor with its inputs, method, resolved
    parameters and dtypes, the output shards with their headers and byte offsets, the
    output config.json and tokenizer, warnings, and a fingerprint of it all.

    `out_shard_size`: the largest output file in bytes; `random_seed`: the seed of the
    random methods; `allow_crimes`: merge models of different architectures;
    `allow_download`: fetch Hub models missing from the cache; `trust_remote_code`: let
    transformers run a model's own tokenizer code. Raises MergeflowError listing every
    problem found (each located at its config line). `unsafe_truncate_embeddings`: vocab
    tensors whose row counts differ, without a tokenizer setting, are cut to the fewest rows
    (mergekit's --unsafe-truncate-embeddings) instead of refused; config.json keeps the
    reference's vocab_size, as mergekit's does. `models`: model references (as the config spells
    them) taken as given instead of read (a multi-stage merge's earlier stages, sources/stage.py)."""
    from mergeflow.plan import modules  # builds on this module's slices

    p = _Planner(config, warnings=list(config.warnings), truncate=unsafe_truncate_embeddings, known=models or {})
    units = modules.plan_units(p, [] if config.modules else _normalize(p, allow_download),
                               allow_download)
    _fail_if(p)
    _check_architectures(p, allow_crimes)
    text = modules.text_unit(units)
    first = units[0].slices[0]
    reference = first.base if first.base is not None else first.sources[0][0]
    ref_model = p.models[reference]
    fam = text.spec.family
    if modules.is_plain(units):
        _check_layer_key(p, ref_model, text.spec.layout)
        _check_layer_ranges(p, text.slices, fam)
    _fail_if(p)
    tokenizer, p.vocab = plan_tokenizer(config, p.models, p.index, reference, fam.embed,
                                        trust_remote_code=trust_remote_code)
    p.warnings += tokenizer.warnings
    tensors = []
    for unit in units:
        unit_tensors, unit.layer_map = _plan_tensors(p, unit.slices, unit.spec.layout, unit.spec.family)
        tensors += unit_tensors
    _check_token_ids(p, tokenizer, tensors, fam)
    _fail_if(p)
    p.warnings += filter_warnings(config, tensors)
    tensors, shards = plan_shards(tensors, out_shard_size)
    out_config = _output_config(p, reference, text.layer_map, tensors, fam) if ref_model.config_file else {}
    if not ref_model.config_file:
        p.warnings.append(f"{ref_model.label} has no config.json (a bare set of tensors, merged by name as "
                          "mergekit-pytorch merges them), so the output's config.json is empty: put the "
                          "model's own config.json there to load it with transformers")
    elif not modules.is_plain(units):
        embed = next((t for t in tensors if t.name in fam.embed), None)
        modules.update_config(out_config, units, p.models, embed.shape[0] if embed else None)
    if p.vocab is not None:
        p.warnings += remap_special_ids(out_config, p.vocab.full[reference], p.vocab.vocab)
    plan = MergePlan(config, tuple(p.models), reference, tuple(tensors), tuple(shards), out_config,
                     random_seed, tuple(dict.fromkeys(p.warnings)), tokenizer=tokenizer,
                     truncated=tuple(p.truncated))
    return _with_fingerprint(plan)


def _fail_if(p: _Planner) -> None:
    if p.problems:
        problems = list(dict.fromkeys(p.problems))
        shown = problems[:50] + ([f"... and {len(problems) - 50} more"] if len(problems) > 50 else [])
        raise MergeflowError(f"{p.config.path}: {len(problems)} problem(s) found while planning "
                             "the merge (no tensor was read):\n" + "\n".join(f"  - {x}" for x in shown))


def _normalize(p: _Planner, allow_download: bool) -> list[_Slice]:
    """Both config layouts as a list of slices; `models:` is one slice over all layers."""
    cfg = p.config
    top_base = p.model(cfg.base_model, ("base_model",), allow_download) if cfg.base_model else None
    if cfg.models:
        sources = []
        for i, m in enumerate(cfg.models):
            idx = p.model(m.model, ("models", i, "model"), allow_download)
            sources.append((idx, 0, m.parameters, ("models", i)))
        if top_base is not None and top_base not in [s[0] for s in sources]:
            sources.append((top_base, 0, None, ("base_model",)))
        if any(s[0] is None for s in sources):
            return []
        counts = {p.models[s[0]].label: _layers_of(p.models[s[0]]) for s in sources}
        if len(set(counts.values())) > 1:
            p.problems.append(f"{cfg.where(('models',))}: the models have different layer counts "
                              f"{counts}; use `slices:` to choose which layers to merge")
        return [_Slice(sources, max(counts.values()), top_base, None, ("models",))]
    slices = []
    for i, sl in enumerate(cfg.slices or []):
        base = top_base
        if sl.base_model is not None:
            base = p.model(sl.base_model, ("slices", i, "base_model"), allow_download)
        sources = [(p.model(s.model, ("slices", i, "sources", j, "model"), allow_download),
                    s.layer_range[0], s.parameters, ("slices", i, "sources", j))
                   for j, s in enumerate(sl.sources)]
        n = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        slices.append(_Slice(sources, n, base, sl.parameters, ("slices", i)))
    return slices if all(s[0] is not None for sl in slices for s in sl.sources) else []


def _layers_of(model: ModelInfo) -> int:
    return arch.infer_layout(list(model.tensors), arch.family(model.config)).layers


def _check_architectures(p: _Planner, allow_crimes: bool) -> None:
    """Models without config.json are bare tensors: their names are checked tensor by tensor."""
    kinds = {m.label: arch.architecture(m.config) for m in p.models if m.config_file}
    if len(set(kinds.values())) > 1 and not allow_crimes:
        listed = ", ".join(f"{k}: {v}" for k, v in kinds.items())
        p.problems.append(f"{p.config.path}: the models have different architectures ({listed}); "
                          "merging across architectures needs --allow-crimes")


def _check_layer_key(p: _Planner, model: ModelInfo, layout: arch.Layout) -> None:
    """The output's config.json starts from this model's: it must say how many layers there are."""
    if model.config_file and layout.layers and arch.layer_count(model.config) is None:
        key = arch.family(model.config).layer_key
        p.problems.append(f"model {model.label}: {model.config_file} has no layer count (`{key}`, an "
                          f"integer), but its tensors have {layout.layers} layers, so the merged model's "
                          f"config.json could not say how many it has; add `\"{key}\": {layout.layers}` to it")


def _check_layer_ranges(p: _Planner, slices: list[_Slice], fam: arch.Family) -> None:
    for sl in slices:
        for model, first, _, loc in sl.sources:
            have = _layers_of(p.models[model])
            if first + sl.layers > have:
                p.problems.append(f"{p.config.where(loc + ('layer_range',))}: layer_range "
                                  f"[{first}, {first + sl.layers}] goes beyond {p.models[model].label}, "
                                  f"which has {have} layers (0..{have - 1})")


def _plan_tensors(p: _Planner, slices: list[_Slice], layout: arch.Layout, fam: arch.Family):
    """Every output tensor in natural order: pre, the stacked layers, post."""
    out: list[TensorPlan] = []
    layer_map: list[tuple[int, int]] = []  # output layer -> (model, source layer)
    for name in sorted(layout.pre, key=arch.natural_key):
        out += _tensor(p, slices[0], name, [name] * len(slices[0].sources), 0.0, fam)
    for sl in slices:
        for k in range(sl.layers):
            t = k / (sl.layers - 1) if sl.layers > 1 else 1.0
            layer_map.append((sl.sources[0][0], sl.sources[0][1] + k))
            for suffix in sorted(layout.layer_suffixes, key=arch.natural_key):
                name = layout.layer_name(len(layer_map) - 1, suffix)
                names = [layout.layer_name(first + k, suffix) for _, first, _, _ in sl.sources]
                out += _tensor(p, sl, name, names, t, fam)
    for name in sorted(layout.post, key=arch.natural_key):
        out += _tensor(p, slices[-1], name, [name] * len(slices[-1].sources), 0.0, fam)
    return out, layer_map


def _find(model: ModelInfo, name: str, fam: arch.Family) -> TensorInfo | None:
    info = model.tensors.get(name)
    if info is None and name == fam.lm_head:  # tied head: the input embedding serves
        info = next((model.tensors[e] for e in fam.embed if e in model.tensors), None)
    return info


def _tensor(p: _Planner, sl: _Slice, name: str, names: list[str], t: float, fam: arch.Family) -> list[TensorPlan]:
    """The plan of one output tensor, or [] with the reason added to p.problems."""
    method, vocab = p.config.method, arch.is_vocab_tensor(name, fam)
    chosen = _inputs(p, sl, name, names, fam, vocab)
    if not isinstance(chosen, tuple):
        return chosen  # copied (a buffer, the base alone) or refused
    found, base = chosen
    values, missing = resolve_all(method, name, t, [f.params for f in found],
                                  [sl.params, sl.module_params, p.config.parameters],
                                  names=[f.info.name for f in found])
    _report_missing(p, sl, name, found, missing)
    for msg in check_values(method, values) if not missing else []:
        p.problems.append(f"{p.config.where(sl.loc)}: {name}: {msg}")
    inputs = tuple(Input(f.model, f.info, f.crop) for f in found)
    base_input = Input(base.model, base.info, base.crop) if base else None
    shape = tuple(found[0].crop or found[0].info.shape)
    kind, params = method.name, tuple(values.items())
    if vocab and p.config.embed_slerp and not missing and kind != "slerp":
        kind, inputs, base_input, params = _embed_slerp(p, name, method.name, values, inputs, base_input, sl.base)
    align = None
    if vocab and p.vocab is not None:
        align = _align(p, name, inputs, base_input, sl.base)
        if align is None:
            return []
        shape = (align.rows, *shape[1:])
    return [TensorPlan(name, kind, inputs, base_input, params, _compute_dtype(p.config),
                       _out_dtype(p.config, inputs, base_input), shape, vocab=align)]


def _inputs(p: _Planner, sl: _Slice, name: str, names: list[str], fam: arch.Family,
            vocab: bool) -> tuple[list[Src], Src | None] | list[TensorPlan]:
    """(inputs, base) to merge, of one shape; or the finished plan: [] (refused, the problem
    added), an integer buffer copied, or the base alone (the method returns it, as mergekit's)."""
    method, where = p.config.method, p.config.where(sl.loc)
    found = _sources(p, sl, name, names, fam)
    if found is None:
        return []
    base = next((f for f in found if f.model == sl.base), None)
    if any(f.info.dtype not in FLOAT_CODES for f in found):
        problem = buffer_problem(name, found, p.label)
        p.problems += [f"{where}: {problem}"] if problem else []
        src = base or found[0]
        return [] if problem else [_passthrough(name, src, CODE_TO_TORCH[src.info.dtype])]
    if method.base == "required" and base is None:
        p.problems.append(f"{where}: {method.name} needs the base model among this slice's sources; add "
                          "it with the same layer_range")
        return []
    found, base = ([f for f in found if f.model != sl.base], base) if method.base != "input" else (found, None)
    if not found:
        return [_passthrough(name, base, _out_dtype(p.config, (Input(base.model, base.info),), None),
                             _compute_dtype(p.config))]
    if vocab and p.vocab is not None:  # with a tokenizer setting, rows are aligned instead
        return found, base
    agreed = same_shape(name, found, base, p.label, vocab, p.truncate)
    if agreed.warning:
        p.warnings.append(agreed.warning)
        p.truncated.append(name)
    p.problems += [f"{where}: {agreed.problem}"] if agreed.problem else []
    return [] if agreed.problem else (agreed.found, agreed.base)


def _sources(p: _Planner, sl: _Slice, name: str, names: list[str], fam: arch.Family) -> list[Src] | None:
    found = []
    for (model, _, params, loc), src_name in zip(sl.sources, names):
        info = _find(p.models[model], src_name, fam)
        if info is None:
            p.problems.append(f"{p.config.where(loc)}: model {p.models[model].label} has no tensor "
                              f"{src_name} (needed for output {name})")
            return None
        found.append(Src(model, info, params))
    return found


def _report_missing(p: _Planner, sl: _Slice, name: str, found: list[Src], missing: list) -> None:
    method = p.config.method
    for param, i in missing:
        who = f" for model {p.models[found[i].model].label}" if i >= 0 else ""
        if (sl.loc, param, who) in p.reported:  # once per model and slice, not per tensor
            continue
        p.reported.add((sl.loc, param, who))
        p.problems.append(f"{p.config.where(sl.loc)}: {method.name} needs `{param}`{who} (first needed "
                          f"by {name}); set it under that model's `parameters:` or the top-level `parameters:`")


def _embed_slerp(p: _Planner, name: str, method: str, values: dict, inputs: tuple[Input, ...],
                 base: Input | None, base_model: int | None):
    """`embed_slerp: true`: a two-model merge's vocab tensor is a slerp from the base (or first
    model) towards the other; t is the other's share of the weights (its weight alone when the
    base has none), 0.5 without weights. Returns (method, inputs, base, params)."""
    every = list(inputs) + ([base] if base else [])
    if len(every) != 2 or every[0].model == every[1].model:
        p.warnings.append(f"embed_slerp applies to two-model merges; {name} has {len(every)} inputs "
                          f"and is merged with {method}")
        return method, inputs, base, tuple(values.items())
    w = values.get("weight")
    if base is not None:
        first, other, t = base, inputs[0], (float(w[0]) if w else 0.5)
    else:
        k = 1 if inputs[1].model == base_model else 0
        first, other = inputs[k], inputs[1 - k]
        t = float(w[1 - k]) / float(w[0] + w[1]) if w and abs(w[0] + w[1]) > 1e-8 else 0.5
    return "slerp", (other,), first, (("t", min(max(t, 0.0), 1.0)),)


def _align(p: _Planner, name: str, inputs: tuple[Input, ...], base: Input | None,
           base_model: int | None) -> VocabAlign | None:
    every = inputs + ((base,) if base else ())
    widths = {tuple(i.tensor.shape[1:]) for i in every}
    if len(widths) > 1:
        listed = ", ".join(f"{p.models[i.model].label}: {'x'.join(map(str, i.tensor.shape))}" for i in every)
        p.problems.append(f"merge of {name}: embedding widths differ ({listed}); vocabularies can be "
                          "aligned, hidden sizes cannot")
        return None
    spec, problems, warnings = align_spec(p.vocab, name, [i.model for i in every],
                                          [i.tensor.shape[0] for i in every], base_model)
    p.problems += problems
    p.warnings += warnings
    return spec


def _check_token_ids(p: _Planner, tokenizer: TokenizerPlan, tensors: list[TensorPlan], fam: arch.Family) -> None:
    """Every id of the saved tokenizer needs a row (a copied tokenizer and cut embeddings may not);
    --unsafe-truncate-embeddings waives it, with a warning, as mergekit writes such a model."""
    short = next((t for t in tensors if arch.is_vocab_tensor(t.name, fam) and tokenizer.max_id is not None
                  and t.shape[0] <= tokenizer.max_id), None)
    if short is not None and short.name in p.truncated:
        p.warnings.append(f"{short.name} gets {short.shape[0]} rows, but the output tokenizer ({tokenizer.source}) "
                          f"has token ids up to {tokenizer.max_id}: the merged model will fail on those tokens")
    elif short is not None:
        p.problems.append(f"{short.name} gets {short.shape[0]} rows, but the output tokenizer ({tokenizer.source}) "
                          f"has token ids up to {tokenizer.max_id}, which would crash the merged model; set "
                          "`tokenizer_source: union` (or base, or a model) to align the vocabularies by token")


def _passthrough(name: str, src: Src, out_dtype: str, compute_dtype: str | None = None) -> TensorPlan:
    return TensorPlan(name, "passthrough", (Input(src.model, src.info),), None, (("scale", (None,)),),
                      compute_dtype, out_dtype, tuple(src.info.shape))


def _compute_dtype(config: MergeConfig) -> str | None:
    return DTYPES[config.dtype] if config.dtype else None


def _out_dtype(config: MergeConfig, inputs: tuple[Input, ...], base: Input | None) -> str:
    import torch

    for key in (config.out_dtype, config.dtype):
        if key:
            return DTYPES[key]
    # no dtype: the kernels compute in the inputs' promoted dtype (base included) and return
    # it, and that is what mergekit 0.1.5 writes too (METHODS.md, "Output dtype")
    inputs = inputs + ((base,) if base is not None else ())
    dt = getattr(torch, CODE_TO_TORCH[inputs[0].tensor.dtype])
    for i in inputs[1:]:
        dt = torch.promote_types(dt, getattr(torch, CODE_TO_TORCH[i.tensor.dtype]))
    return str(dt).removeprefix("torch.")


def _output_config(p: _Planner, reference: int, layer_map: list, tensors: list[TensorPlan],
                   fam: arch.Family) -> dict[str, Any]:
    """The reference model's config.json with the new layer count, dtype and vocab size."""
    cfg = json.loads(json.dumps(p.models[reference].config))
    old_layers = arch.layer_count(cfg)
    for key in {fam.layer_key, "num_hidden_layers"} & set(cfg):
        cfg[key] = len(layer_map)
    if old_layers and len(layer_map) != old_layers:  # per-layer lists follow their layers
        for key, value in list(cfg.items()):
            if isinstance(value, list) and len(value) == old_layers:
                cfg[key] = [_layer_value(p.models[m].config.get(key), value, i) for m, i in layer_map]
    elements = Counter()  # float output dtype -> elements written in it
    for t in tensors:
        if TORCH_TO_CODE.get(t.out_dtype) in FLOAT_CODES:
            elements[t.out_dtype] += math.prod(t.shape)
    if elements:
        dtype = p.config.out_dtype or p.config.dtype
        # without a dtype setting: the dtype that holds most of the weights
        cfg["torch_dtype"] = DTYPES[dtype] if dtype else max(sorted(elements), key=elements.get)
        if "dtype" in cfg or "transformers_version" in cfg:
            cfg["dtype"] = cfg["torch_dtype"]
    embed = next((t for t in tensors if t.name in fam.embed), None)
    if embed is not None and "vocab_size" in cfg and embed.vocab is not None:
        cfg["vocab_size"] = embed.shape[0]  # the output tokenizer's rows; else the donor's, as mergekit
    return cfg


def _layer_value(own, reference: list, i: int):
    """Entry i of a per-layer config list: the source model's own, else the reference's."""
    if isinstance(own, list) and i < len(own):
        return own[i]
    return reference[min(i, len(reference) - 1)]


def _with_fingerprint(plan: MergePlan) -> MergePlan:
    """A hash of everything that decides the output bytes, input file stats included."""
    h = hashlib.sha256()
    h.update(json.dumps([__version__, plan.seed, plan.out_config], sort_keys=True, default=str).encode())
    for t in plan.tensors:
        h.update(json.dumps(asdict(t), sort_keys=True, default=str).encode())
    for s in plan.shards:
        h.update(s.file.encode() + s.header)
    for m in plan.models:
        for f in m.files():
            st = os.stat(f)
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return _replace(plan, fingerprint=h.hexdigest()[:32])


def _replace(plan: MergePlan, **changes) -> MergePlan:
    import dataclasses

    return dataclasses.replace(plan, **changes)
