"""The router weights of a MoE: gate vectors from prompts, or random ones.

mergekit-moe's gate modes, with its arithmetic (and dtypes) step by step, so the routers are
the same bytes:
- `hidden` / `hidden_last` (`hidden_avg`): the base model, loaded by transformers in bfloat16,
  runs each expert's prompts (`<bos>` + prompt, left-padded with the BOS token); layer i's
  vector is its input hidden state at the last token (averaged over the sequence), averaged
  over the prompts; minus the same of the negative prompts; normalized.
- `cheap_embed`: the sum, over the prompts' tokens, of their input embeddings (float32),
  normalized; minus the same of the negative prompts; normalized again; every layer alike.
- `random`: N(0, 1) in float32; `uniform_random`: U(-1/sqrt(hidden), 1/sqrt(hidden)), as
  torch.nn.Linear initializes. Each router tensor is drawn by its own generator, seeded from
  --random-seed and the tensor's name, so the bytes do not depend on the scheduler (mergekit
  draws all layers from one global generator: the same distribution, other numbers).
`gate_vectors` returns (layers, gated experts, hidden) for the prompted modes; one task runs
it, loading the model once, and each router's write takes its rows.
"""

from __future__ import annotations

import hashlib
import math

import torch

from mergeflow.errors import MergeflowError
from mergeflow.plan.moe import GatePlan
from mergeflow.spec.moe import HIDDEN_MODES

DEGENERATE = 5.0  # mergekit warns when a layer's gate vectors have a condition number above this


def seeded(seed: int, name: str) -> torch.Generator:
    """A CPU generator for one tensor, seeded from (run seed, tensor name) alone."""
    digest = hashlib.sha256(f"{seed}\0{name}\0moe".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def random_gate(mode: str, seed: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """`random` or `uniform_random` router weights for the router `name` (float32)."""
    gen = seeded(seed, name)
    if mode == "random":
        return torch.randn(shape, generator=gen)
    bound = math.sqrt(1.0 / shape[-1])
    return torch.rand(shape, generator=gen) * 2 * bound - bound


def gate_vectors(plan: GatePlan) -> torch.Tensor:
    """(layers, gated experts, hidden): each expert's normalized prompt vector per layer."""
    tokenizer = load_tokenizer(plan)
    embed = _hidden_states(plan) if plan.mode in HIDDEN_MODES else _embedding_sum(plan)
    vectors = []
    for positive, negative in plan.prompts:
        v = embed(tokenize(tokenizer, positive))
        if negative:
            v -= embed(tokenize(tokenizer, negative))
        v /= v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        vectors.append(v)
    return torch.stack(vectors, dim=0).permute(1, 0, 2).cpu()


def load_tokenizer(plan: GatePlan):
    """The base's tokenizer, padding on the left with BOS (EOS without one), as mergekit."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(plan.base, trust_remote_code=plan.trust_remote_code)
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenize(tokenizer, prompts: tuple[str, ...]):
    return tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt",
                     padding=True, add_special_tokens=False)


def _embedding_sum(plan: GatePlan):
    """cheap_embed: per prompt set, the normalized sum of its tokens' embeddings (float32)."""
    from safetensors import safe_open

    info = plan.embed.tensor
    with safe_open(info.file, framework="pt") as f:
        table = f.get_tensor(info.name).float()

    def embed(tokens) -> torch.Tensor:
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        if int(ids.max()) >= table.shape[0]:
            raise MergeflowError(f"cheap_embed: the tokenizer of {plan.base} gives token id "
                                 f"{int(ids.max())}, but {info.name} has {table.shape[0]} rows")
        h = table[ids]  # (prompts, tokens, hidden): the rows a one-hot product picks
        total = (h * mask.unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
        return (total / total.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(plan.layers, 1)

    return embed


def _hidden_states(plan: GatePlan):
    """hidden modes: per prompt set, each layer's input hidden state (last token, or averaged
    over the sequence), averaged over the prompts, in the model's bfloat16."""
    model = _load_model(plan)
    average = plan.mode == "hidden_avg"

    def embed(tokens) -> torch.Tensor:
        with torch.no_grad():
            out = model(**tokens.to(model.device), output_hidden_states=True, return_dict=True)
        states = torch.stack(out.hidden_states[:-1])  # (layers, prompts, tokens, hidden)
        states = states.sum(dim=2) / states.shape[2] if average else states[:, :, -1, :]
        return states.sum(dim=1) / states.shape[1]

    return embed


def _load_model(plan: GatePlan):
    import transformers

    kwargs = {}
    if plan.quantization is not None:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            **{f"load_in_{plan.quantization}": True})
    if plan.device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeflowError(f"--device {plan.device}: this worker has no CUDA device")
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(
            plan.base, dtype=torch.bfloat16, device_map=plan.device, low_cpu_mem_usage=True,
            trust_remote_code=plan.trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise MergeflowError(f"gate_mode {plan.mode}: transformers cannot load the base model "
                             f"{plan.base} for its hidden states: {e}") from None


def degenerate_layers(vectors: torch.Tensor) -> list[int]:
    """The layers whose gate vectors are nearly dependent (mergekit's warning)."""
    return [i for i in range(vectors.shape[0])
            if float(torch.linalg.cond(vectors[i].float())) > DEGENERATE]


def degenerate_warning(layers: list[int], total: int) -> str | None:
    if not layers:
        return None
    if len(layers) >= total or len(layers) == 1:
        which = "every layer of the router has" if len(layers) >= total else f"layer {layers[0]} of the router has"
    else:
        which = f"layers {', '.join(map(str, layers))} of the router have"
    return (f"{which} nearly dependent gate vectors: the prompts may be too similar, and some experts "
            "will be rarely used")
