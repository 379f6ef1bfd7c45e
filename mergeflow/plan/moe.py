"""Plan a mixture of experts from a base and dense experts: pure data, no dask, no tensor bytes.

Every output tensor is a concatenation of *parts* (contiguous blocks of its bytes): a copy of
one input tensor (attention, norms, embeddings from the base; each expert's MLP weights, with
`residual_scale` on down_proj), an expert weight with gaussian noise (`noise_scale`), zeros
(Qwen2-MoE's attention biases a Llama base lacks) or router rows (the gate vectors). A fused
Mixtral tensor `experts.gate_up_proj` [E, 2I, H] is 2E parts: expert e's gate_proj, then its
up_proj. Copies become passthrough TensorPlans, streamed by the engine like any merge; the
rest are `Write`s that exec/moe.py's own tasks write. Shard headers and every part's byte
range are fixed here, before any tensor is read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from mergeflow import __version__
from mergeflow.dtypes import CODE_TO_TORCH, DTYPES
from mergeflow.errors import MergeflowError
from mergeflow.plan.moe_arch import EMBED, LM_HEAD, MLP, NORM, Arch, choose_arch
from mergeflow.plan.planner import Input, TensorPlan
from mergeflow.plan.shards import ShardPlan, plan_shards, tensor_nbytes
from mergeflow.sources import architectures as archs
from mergeflow.sources.models import ModelInfo, read_model
from mergeflow.spec.moe import HIDDEN_MODES, Expert, MoEConfig


@dataclass(frozen=True)
class Write:
    """A block of an output tensor written by mergeflow moe's own tasks (exec/moe.py)."""

    name: str  # the journal's and the task's name
    kind: Literal["noise", "zeros", "gate"]
    shape: tuple[int, ...]
    out_dtype: str
    shard: int = 0
    begin: int = 0
    end: int = 0
    input: Input | None = None  # noise: the tensor it is added to
    noise: float | None = None  # noise: its standard deviation
    scale: float | None = None  # noise: then multiplied by this (residual_scale)
    layer: int = 0  # gate: the layer, and the rows of its gate vectors
    rows: tuple[int, int] = (0, 0)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class GatePlan:
    """How the router weights are made. prompts: (positive, negative) of each gated expert,
    the routed ones, then the shared one (Qwen2-MoE)."""

    mode: str
    base: str  # the base model's directory (its tokenizer; `hidden`: the model)
    prompts: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]
    layers: int
    hidden_size: int
    embed: Input | None = None  # cheap_embed: the base's input embedding
    device: str = "cpu"
    quantization: str | None = None  # hidden: "4bit" or "8bit" (bitsandbytes)
    trust_remote_code: bool = False


@dataclass(frozen=True)
class MoEPlan:
    config: MoEConfig
    models: tuple[ModelInfo, ...]  # the base first
    architecture: str
    copies: tuple[TensorPlan, ...]  # passthrough copies, streamed by the engine
    writes: tuple[Write, ...]  # noise, zeros and routers: exec/moe.py's tasks
    gates: GatePlan
    shards: tuple[ShardPlan, ...]  # `tensors`: the names of the parts (journal names)
    out_config: str  # the text of config.json
    vocab_rows: tuple[tuple[str, int], ...] = ()  # embedding / LM head rows (checked at the end)
    seed: int = 0
    warnings: tuple[str, ...] = ()
    fingerprint: str = ""

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.copies) + tuple(w.name for w in self.writes)

    @property
    def bytes_read(self) -> int:
        return sum(i.tensor.nbytes for t in self.copies for i in t.inputs) + sum(
            w.input.tensor.nbytes for w in self.writes if w.input is not None)

    @property
    def bytes_written(self) -> int:
        return sum(s.size for s in self.shards)


@dataclass(frozen=True)
class _Part:
    shape: tuple[int, ...]
    input: Input | None = None  # a copy (or with noise); None: zeros or a gate
    noise: float | None = None
    scale: float | None = None
    gate: tuple[int, int, int] | None = None  # (layer, first row, end row)


@dataclass
class _Out:
    name: str
    parts: list[_Part]
    dtype: str | None = None  # None: the promoted dtype of its inputs
    shape: tuple[int, ...] = ()


@dataclass
class _Planner:
    config: MoEConfig
    models: list[ModelInfo] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def model(self, loc: tuple, ref, allow_download: bool) -> int | None:
        key = str(ref)
        if key not in self.index:
            try:
                self.models.append(read_model(ref, allow_download=allow_download))
                self.index[key] = len(self.models) - 1
            except MergeflowError as e:
                self.problems.append(f"{self.config.where(loc)}: {e}")
                self.index[key] = -1
        return self.index[key] if self.index[key] >= 0 else None

    def tensor(self, model: int, name: str, loc: tuple, optional: bool = False) -> Input | None:
        info = self.models[model].tensors.get(name)
        if info is None and not optional:
            self.problems.append(f"{self.config.where(loc)}: model {self.models[model].label} has no "
                                 f"tensor {name}")
        return None if info is None else Input(model, info)

    def fail_if(self) -> None:
        if self.problems:
            listed = "\n".join(f"  - {p}" for p in list(dict.fromkeys(self.problems))[:50])
            raise MergeflowError(f"{self.config.path}: {len(self.problems)} problem(s) found while "
                                 f"planning the MoE (no tensor was read):\n{listed}")


def plan_moe(config: MoEConfig, *, out_shard_size: int = 5_000_000_000, random_seed: int = 0,
             allow_crimes: bool = False, allow_all_same: bool = False, device: str = "cpu",
             quantization: str | None = None, allow_download: bool = True,
             trust_remote_code: bool = False) -> MoEPlan:
    """Plan the MoE from headers alone; raise MergeflowError listing every problem."""
    p = _Planner(config)
    refs = [(loc, ref, p.model(loc, ref, allow_download)) for loc, ref in config.model_refs()]
    p.fail_if()
    _check_distinct(p, allow_all_same)
    p.fail_if()
    arch, warnings = choose_arch(config, [p.models[m].config.get("model_type", "") for _, _, m in refs],
                                 allow_crimes)
    base_cfg = _hf_config(p.models[0], trust_remote_code)
    dtype = _out_dtype(config, base_cfg)
    layers, hidden = int(base_cfg.num_hidden_layers), int(base_cfg.hidden_size)
    experts = [(e, refs[1 + i][2], ("experts", i)) for i, e in enumerate(config.experts)]
    shared = [(e, refs[1 + len(experts) + i][2], ("shared_experts", i))
              for i, e in enumerate(config.shared_experts or [])]
    outs = _globals(p, arch, layers) + [o for layer in range(layers)
                                        for o in _layer(p, arch, layer, experts, shared, hidden, base_cfg)]
    p.fail_if()
    gates = _gate_plan(p, arch, experts, shared, layers, hidden, device, quantization, trust_remote_code)
    p.fail_if()
    copies, writes, shards = _place(outs, dtype, gates.mode, out_shard_size)
    if arch.warn_power_of_two and len(experts) & (len(experts) - 1):
        warnings.append(f"{len(experts)} experts is not a power of two; llama.cpp cannot run this model")
    rows = tuple((o.name, o.shape[0]) for o in outs if o.name in (EMBED, LM_HEAD))
    plan = MoEPlan(config, tuple(p.models), arch.name, tuple(copies), tuple(writes), gates, tuple(shards),
                   arch.out_config(base_cfg, config, dtype, str(config.base_model.path)), rows, random_seed,
                   tuple(dict.fromkeys([*config.warnings, *warnings])))
    return _with_fingerprint(plan)


def _check_distinct(p: _Planner, allow_all_same: bool) -> None:
    """mergekit-moe's refusal of a MoE whose experts are all one model (prompted gate modes)."""
    cfg = p.config
    if cfg.gate_mode == "random" or allow_all_same or len(cfg.experts) < 2:
        return
    if len({str(e.source_model) for e in cfg.experts}) == 1:
        p.problems.append(f"{cfg.where(('experts',))}: every expert is {cfg.experts[0].source_model}, "
                          "which makes a model that costs more and computes the same; pass "
                          "--i-understand-this-is-not-useful-without-training if you will train it")


def _hf_config(base: ModelInfo, trust_remote_code: bool):
    """The base's transformers config (mergekit builds the output config from it)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(base.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise MergeflowError(f"model {base.label}: transformers cannot read its config.json ({e})") from None


def _out_dtype(config: MoEConfig, base_cfg) -> str | None:
    """`dtype:`, else the base's config dtype, else None (each tensor keeps its own)."""
    if config.dtype:
        return DTYPES[config.dtype]
    dt = getattr(base_cfg, "dtype", None)
    if dt is None:
        return None
    name = str(dt).removeprefix("torch.")
    return DTYPES.get(name)


def _globals(p: _Planner, arch: Arch, layers: int) -> list[_Out]:
    out = [_Out(EMBED, [_copy(p, EMBED)]), _Out(NORM, [_copy(p, NORM)])]
    head = p.tensor(0, LM_HEAD, ("base_model",), optional=True)  # tied: the embedding serves
    return out + ([_Out(LM_HEAD, [_Part(tuple(head.tensor.shape), head)])] if head else [])


def _copy(p: _Planner, name: str) -> _Part:
    inp = p.tensor(0, name, ("base_model",))
    return _Part(tuple(inp.tensor.shape) if inp else (), inp)


def _layer(p: _Planner, arch: Arch, layer: int, experts: list, shared: list, hidden: int,
           base_cfg) -> list[_Out]:
    prefix = f"model.layers.{layer}."
    out = []
    for suffix in arch.layer_tensors:
        inp = p.tensor(0, prefix + suffix, ("base_model",), optional=suffix in arch.zeros_if_missing)
        if inp is None and suffix in arch.zeros_if_missing:
            out.append(_Out(prefix + suffix, [_Part((_bias_rows(suffix, base_cfg),))], "float32"))
        else:
            out.append(_Out(prefix + suffix, [_Part(tuple(inp.tensor.shape) if inp else (), inp)]))
    weights = {(i, proj): _expert_part(p, e, m, loc, f"{prefix}mlp.{proj}.weight")
               for i, (e, m, loc) in enumerate(experts) for proj in MLP}
    if arch.fused:
        out.append(_Out(prefix + "mlp.experts.gate_up_proj",
                        [weights[i, proj] for i in range(len(experts)) for proj in ("gate_proj", "up_proj")]))
        out.append(_Out(prefix + "mlp.experts.down_proj", [weights[i, "down_proj"] for i in range(len(experts))]))
    else:
        out += [_Out(f"{prefix}mlp.experts.{i}.{proj}.weight", [weights[i, proj]])
                for i in range(len(experts)) for proj in MLP]
        for e, m, loc in shared[:1] if arch.shared_module else []:
            out += [_Out(f"{prefix}mlp.{arch.shared_module}.{proj}.weight",
                         [_expert_part(p, e, m, loc, f"{prefix}mlp.{proj}.weight")]) for proj in MLP]
    n = len(experts)
    out.append(_Out(prefix + "mlp.gate.weight", [_Part((n, hidden), gate=(layer, 0, n))]))
    if arch.shared_gate:
        out.append(_Out(prefix + "mlp.shared_expert_gate.weight", [_Part((1, hidden), gate=(layer, n, n + 1))]))
    return out


def _bias_rows(suffix: str, base_cfg) -> int:
    """A zero attention bias's length, as mergekit sizes it: heads x hidden_size // heads."""
    heads = base_cfg.num_attention_heads
    kv = suffix.startswith(("self_attn.k_proj", "self_attn.v_proj"))
    return (base_cfg.num_key_value_heads if kv else heads) * (base_cfg.hidden_size // heads)


def _expert_part(p: _Planner, expert: Expert, model: int, loc: tuple, name: str) -> _Part:
    """One expert's MLP weight `name`, which must have the base's shape (the output config is
    the base's: its intermediate size, and fused tensors stack the experts' weights)."""
    inp = p.tensor(model, name, loc + ("source_model",))
    base = p.models[0].tensors.get(name)
    if inp is not None and base is not None and inp.tensor.shape != base.shape:
        p.problems.append(f"{p.config.where(loc + ('source_model',))}: {name} of {p.models[model].label} "
                          f"has shape {list(inp.tensor.shape)}, the base's {list(base.shape)}; every expert "
                          "needs the base's MLP shapes")
    scale = expert.residual_scale if name.endswith("down_proj.weight") else None
    return _Part(tuple(inp.tensor.shape) if inp else (), inp, expert.noise_scale, scale)


def _shape(o: _Out) -> tuple[int, ...]:
    """An output tensor's shape from its parts: a fused tensor stacks one block per expert."""
    first = o.parts[0].shape
    if len(o.parts) == 1:
        return first
    per_expert = 2 if o.name.endswith("gate_up_proj") else 1
    return (len(o.parts) // per_expert, first[0] * per_expert, *first[1:])


def _gate_plan(p: _Planner, arch: Arch, experts: list, shared: list, layers: int, hidden: int,
               device: str, quantization: str | None, trust_remote_code: bool) -> GatePlan:
    cfg = p.config
    gated = [e for e, _, _ in experts] + ([shared[0][0]] if arch.shared_gate else [])
    embed = None
    if cfg.gate_mode == "cheap_embed":
        embed = p.tensor(0, EMBED, ("base_model",))
    if cfg.gate_mode in ("cheap_embed", *HIDDEN_MODES) and cfg.base_model.lora:
        p.problems.append(f"{cfg.where(('base_model',))}: gate_mode {cfg.gate_mode} reads the base "
                          "model as stored, without its LoRA adapter; merge the adapter into the base "
                          "first (`mergeflow run` with passthrough) or use gate_mode random")
    if embed is not None and embed.tensor.shape[-1] != hidden:
        p.problems.append(f"{EMBED}: width {embed.tensor.shape[-1]}, but the base's hidden_size is {hidden}")
    return GatePlan(cfg.gate_mode, p.models[0].path, tuple(e.prompts() for e in gated), layers, hidden,
                    embed, device, quantization if cfg.gate_mode in HIDDEN_MODES else None,
                    trust_remote_code)


def _gate_dtype(mode: str) -> str:
    """What the gate vectors are computed in: the bfloat16 model's hidden states, float32 else."""
    return "bfloat16" if mode in HIDDEN_MODES else "float32"


def _place(outs: list[_Out], dtype: str | None, mode: str, max_size: int):
    """Shards in output order; every part's byte range; copies as passthrough TensorPlans."""
    for o in outs:
        o.shape = _shape(o)
        o.dtype = dtype or o.dtype or (_gate_dtype(mode) if o.parts[0].gate else _promoted(o.parts))
    ordered = sorted(outs, key=_order)
    wholes = [TensorPlan(o.name, "passthrough", (), None, (), None, o.dtype, o.shape) for o in ordered]
    placed, shards = plan_shards(wholes, max_size)
    copies, writes, names = [], [], {k: [] for k in range(len(shards))}
    for o, whole in zip(ordered, placed):
        offset = whole.begin
        for k, part in enumerate(o.parts):
            name = o.name if len(o.parts) == 1 else f"{o.name}[{k}]"
            end = offset + tensor_nbytes(o.dtype, part.shape)
            where = {"shard": whole.shard, "begin": offset, "end": end}
            if part.input is not None and part.noise is None:
                copies.append(TensorPlan(name, "passthrough", (part.input,), None, (("scale", (part.scale,)),),
                                         None, o.dtype, part.shape, **where))
            elif part.input is not None:
                writes.append(Write(name, "noise", part.shape, o.dtype, input=part.input, noise=part.noise,
                                    scale=part.scale, **where))
            elif part.gate is not None:
                writes.append(Write(name, "gate", part.shape, o.dtype, layer=part.gate[0],
                                    rows=part.gate[1:], **where))
            else:
                writes.append(Write(name, "zeros", part.shape, o.dtype, **where))
            names[whole.shard].append(name)
            offset = end
    shards = [dataclasses.replace(s, tensors=tuple(names[k])) for k, s in enumerate(shards)]
    return copies, writes, shards


def _promoted(parts: list[_Part]) -> str:
    import torch

    dts = [getattr(torch, CODE_TO_TORCH[part.input.tensor.dtype]) for part in parts if part.input]
    dt = dts[0]
    for other in dts[1:]:
        dt = torch.promote_types(dt, other)
    return str(dt).removeprefix("torch.")


def _order(o: _Out) -> tuple:
    """Embeddings first, then the layers, then the final norm and LM head (file order)."""
    group = 0 if o.name == EMBED else 2 if o.name in (NORM, LM_HEAD) else 1
    return (group, archs.natural_key(o.name))


def _with_fingerprint(plan: MoEPlan) -> MoEPlan:
    """A hash of everything that decides the output bytes, input file stats included."""
    h = hashlib.sha256()
    h.update(json.dumps([__version__, plan.seed, plan.architecture, plan.out_config, plan.config.text,
                         asdict(plan.gates)], sort_keys=True, default=str).encode())
    for t in plan.copies:
        h.update(json.dumps(asdict(t), sort_keys=True, default=str).encode())
    for w in plan.writes:
        h.update(json.dumps(asdict(w), sort_keys=True, default=str).encode())
    for s in plan.shards:
        h.update(s.file.encode() + s.header)
    files = {f for m in plan.models for f in m.files()}
    files |= {str(f) for f in Path(plan.gates.base).glob("*.json")}  # config, tokenizer
    for f in sorted(files):
        st = os.stat(f)
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return dataclasses.replace(plan, fingerprint=h.hexdigest()[:32])


__all__ = ["GatePlan", "MoEPlan", "Write", "plan_moe"]
