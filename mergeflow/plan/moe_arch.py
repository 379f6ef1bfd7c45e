"""The output architectures of `mergeflow moe` and how one is chosen, as mergekit-moe chooses.

Mixtral, DeepSeek MoE, Qwen MoE (Qwen2-MoE) and Qwen3 MoE, in mergekit-moe's order. Each says
which configs it supports (input model types, shared experts and their prompts), which of the
base's tensors it keeps, how the experts' MLPs are laid out (fused `experts.gate_up_proj` /
`experts.down_proj` tensors, or one module per expert) and which routers it has, and builds
its config.json as mergekit-moe 0.1.5 does (through transformers' config classes, so the text
is the same). The choice: the architectures whose name starts with `architecture:` (all
without it), of those the ones that support the config; Mixtral if it is one, else the first.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from mergeflow.errors import MergeflowError
from mergeflow.spec.moe import MoEConfig

ATTENTION = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
             "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight")
QKV_BIAS = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")
QK_NORM = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
MLP = ("gate_proj", "up_proj", "down_proj")  # `mlp.<p>.weight` of each dense model
EMBED, NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


@dataclass(frozen=True)
class Arch:
    """One output architecture. `supports(config, model types, allow_crimes)` gives the reason
    it cannot take the config, or None; `out_config(base config, config, dtype)` the text of
    config.json."""

    name: str
    layer_tensors: tuple[str, ...]  # the base's non-MLP tensors of each layer that it keeps
    zeros_if_missing: tuple[str, ...]  # of those, written as zeros when the base lacks them
    fused: bool  # experts as [E, 2I, H] gate_up_proj and [E, H, I] down_proj tensors
    shared_module: str | None  # per-expert layouts: the shared expert's module name
    shared_gate: bool  # a router for the shared expert (mlp.shared_expert_gate.weight)
    warn_power_of_two: bool
    supports: Callable[[MoEConfig, list[str], bool], str | None]
    out_config: Callable[..., str]


def _same_types(types: list[str], allowed: tuple[str, ...], name: str, crimes: bool) -> str | None:
    if any(t not in allowed for t in types):
        return f"{name} takes {' or '.join(allowed)} models, not {', '.join(sorted(set(types) - set(allowed)))}"
    if len(set(types)) > 1 and not crimes:
        return (f"{name} needs every model to have the same architecture (model types: "
                f"{', '.join(sorted(set(types)))}; --allow-crimes mixes them)")
    return None


def _mixtral_supports(cfg: MoEConfig, types: list[str], crimes: bool) -> str | None:
    if cfg.shared_experts:
        return "Mixtral has no shared experts"
    return _same_types(types, ("llama", "mistral"), "Mixtral", crimes)


def _deepseek_supports(cfg: MoEConfig, types: list[str], crimes: bool) -> str | None:
    shared = cfg.shared_experts or []
    if len(shared) > 1:
        return "DeepSeek MoE takes at most one shared expert"
    if shared and (shared[0].positive_prompts or shared[0].negative_prompts):
        return "DeepSeek MoE does not gate its shared expert (it has prompts)"
    return _same_types(types, ("llama", "mistral"), "DeepSeek MoE", crimes)


def _qwen_supports(cfg: MoEConfig, types: list[str], crimes: bool) -> str | None:
    shared = cfg.shared_experts or []
    if len(shared) != 1:
        return "Qwen MoE needs exactly one shared expert"
    if cfg.gate_mode != "random" and not shared[0].positive_prompts:
        return "Qwen MoE gates its shared expert, which needs `positive_prompts`"
    return _same_types(types, ("llama", "mistral", "qwen2"), "Qwen MoE", crimes)


def _qwen3_supports(cfg: MoEConfig, types: list[str], crimes: bool) -> str | None:
    if cfg.shared_experts:
        return "Qwen3 MoE has no shared experts"
    return _same_types(types, ("qwen3",), "Qwen3 MoE", crimes)


def _experts(cfg: MoEConfig) -> tuple[int, int]:
    return len(cfg.experts), cfg.experts_per_token or 2


def _dtype(name: str | None):
    import torch

    return getattr(torch, name) if name else None


def _mixtral_config(base, cfg: MoEConfig, dtype: str | None, base_ref: str) -> str:
    import transformers

    if not isinstance(base, transformers.MistralConfig):  # through Mistral's config, as mergekit
        mistral = transformers.MistralConfig(**base.to_dict())
        mistral.sliding_window = None
        mistral.max_position_embeddings = base.max_position_embeddings
        base = mistral
    out = transformers.MixtralConfig(**base.to_dict())
    out.architectures = ["MixtralForCausalLM"]
    out.num_local_experts, out.num_experts_per_tok = _experts(cfg)
    out.sliding_window = None
    out.dtype = _dtype(dtype)
    return out.to_json_string(use_diff=True)


def _qwen_config(base, cfg: MoEConfig, dtype: str | None, base_ref: str) -> str:
    from transformers import Qwen2MoeConfig

    out = Qwen2MoeConfig(**base.to_dict())
    out.architectures = ["Qwen2MoeForCausalLM"]
    out.num_experts, out.num_experts_per_tok = _experts(cfg)
    out.decoder_sparse_step, out.norm_topk_prob = 1, True
    out.sliding_window, out.use_sliding_window = None, False
    out.shared_expert_intermediate_size = out.moe_intermediate_size = out.intermediate_size
    if dtype is not None:
        out.dtype = _dtype(dtype)
    return out.to_json_string(use_diff=True)


def _qwen3_config(base, cfg: MoEConfig, dtype: str | None, base_ref: str) -> str:
    from transformers import Qwen3MoeConfig

    out = Qwen3MoeConfig(**base.to_dict())
    out.architectures = ["Qwen3MoeForCausalLM"]
    out.num_experts, out.num_experts_per_tok = _experts(cfg)
    out.decoder_sparse_step, out.norm_topk_prob = 1, True
    out.moe_intermediate_size = out.intermediate_size
    if dtype is not None:
        out.dtype = _dtype(dtype)
    return out.to_json_string(use_diff=True)


# DeepSeek MoE (v1) has no class in transformers: its config names the Hub's remote code
DEEPSEEK_CODE = "deepseek-ai/deepseek-moe-16b-base--"


def _deepseek_config(base, cfg: MoEConfig, dtype: str | None, base_ref: str) -> str:
    shared = len(cfg.shared_experts or [])
    out = base.to_dict()
    out["_name_or_path"] = base_ref  # as the config names the base (mergekit loads it so)
    out.update({
        "architectures": ["DeepseekForCausalLM"], "model_type": "deepseek",
        "n_routed_experts": len(cfg.experts), "n_shared_experts": shared or None,
        "num_experts_per_tok": cfg.experts_per_token or (1 if shared else 2),
        "first_k_dense_replace": 0, "moe_layer_freq": 1, "scoring_func": "softmax",
        "norm_topk_prob": True, "moe_intermediate_size": out["intermediate_size"],
        "auto_map": {"AutoConfig": DEEPSEEK_CODE + "configuration_deepseek.DeepseekConfig",
                     "AutoModel": DEEPSEEK_CODE + "modeling_deepseek.DeepseekModel",
                     "AutoModelForCausalLM": DEEPSEEK_CODE + "modeling_deepseek.DeepseekForCausalLM"}})
    if dtype is not None:
        out["torch_dtype"] = dtype
    return json.dumps(out, indent=4)


ARCHITECTURES = (
    Arch("Mixtral", ATTENTION, (), True, None, False, True, _mixtral_supports, _mixtral_config),
    Arch("DeepSeek MoE", ATTENTION, (), False, "shared_experts", False, False, _deepseek_supports,
         _deepseek_config),
    Arch("Qwen MoE", ATTENTION + QKV_BIAS, QKV_BIAS, False, "shared_expert", True, True, _qwen_supports,
         _qwen_config),
    Arch("Qwen3 MoE", ATTENTION + QK_NORM, (), True, None, False, True, _qwen3_supports, _qwen3_config),
)


def choose_arch(cfg: MoEConfig, types: list[str], allow_crimes: bool) -> tuple[Arch, list[str]]:
    """The output architecture for `cfg` (models of `types`: base, experts, shared experts) and
    the warnings of the choice; a MergeflowError naming why each candidate was refused."""
    names = ", ".join(a.name for a in ARCHITECTURES)
    wanted = cfg.architecture
    candidates = [a for a in ARCHITECTURES if not wanted or a.name.lower().startswith(wanted.lower())]
    if not candidates:
        raise MergeflowError(f"{cfg.where(('architecture',))}: no output architecture matches "
                             f"`architecture: {wanted}`; mergeflow moe writes {names}")
    reasons = {a.name: a.supports(cfg, types, allow_crimes) for a in candidates}
    fits = [a for a in candidates if reasons[a.name] is None]
    if not fits:
        why = "\n".join(f"  - {name}: {reason}" for name, reason in reasons.items())
        raise MergeflowError(f"{cfg.path}: no output architecture can hold this MoE:\n{why}")
    mixtral = [a for a in fits if a.name == "Mixtral"]  # mergekit's default, for older configs
    if mixtral:
        return mixtral[0], []
    if len(fits) > 1:
        return fits[0], [f"{' and '.join(a.name for a in fits)} can hold this MoE; writing "
                         f"{fits[0].name}, the first (set `architecture:` to choose)"]
    return fits[0], []
