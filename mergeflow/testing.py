"""Build tiny, deterministic Hugging Face models for tests, examples and benchmarks.

`make_model` writes a real model directory (config.json, safetensors shards, generation
config, a byte-level BPE tokenizer) that `transformers` loads; given `base=`, it writes a
fine-tune of that model instead: the same tensors plus seeded gaussian noise (a task vector),
with embedding rows carried over by token string so tokenizer variants stay comparable.
`make_family` builds a base and several fine-tunes; `make_vlm_family` the same for a tiny
vision-language model (several modules); `arch_for_size` picks dimensions for a model of a
given byte size (benchmarks). Same arguments, same bytes; no network.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = [
    "CHAT_TOKENS",
    "CHATML_TEMPLATE",
    "FAMILIES",
    "SPECIAL_TOKENS",
    "TokenizerSpec",
    "arch_for_size",
    "build_tokenizer",
    "iter_tensors",
    "make_family",
    "make_model",
    "make_vlm_family",
]

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0-3 unless the vocabulary is permuted
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
FAMILIES = {  # family -> (config class, model class) in transformers
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
}
_ARCH_DEFAULTS = {"family": "llama", "hidden": 64, "layers": 4, "intermediate": 128,
                  "heads": 4, "kv_heads": 2, "tie_word_embeddings": False}
_MAX_POSITIONS = 512
_INIT_STD = 0.02
_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
_DTYPES_ST = {v: k for k, v in _ST_DTYPES.items()}
_BYTE_SYMBOLS = 256


@dataclass(frozen=True)
class TokenizerSpec:
    """What tokenizer `make_model` writes.

    vocab_size: size of the BPE vocabulary, the four SPECIAL_TOKENS included (>= 260: the
        256 byte symbols are always there); merges are trained on a fixed built-in corpus and
        the rest, if any, is filled with unreachable `<extra_i>` tokens.
    added_tokens: special tokens appended after the vocabulary (e.g. CHAT_TOKENS).
    permute_seed: when set, the vocabulary's ids (special tokens included) are shuffled with
        this seed: the same tokens and merges under different ids.
    chat_template: a Jinja template written into tokenizer_config.json.
    """

    vocab_size: int = 384
    added_tokens: tuple[str, ...] = ()
    permute_seed: int | None = None
    chat_template: str | None = None


# ----------------------------------------------------------------------------- tokenizer


def _corpus() -> list[str]:
    """A fixed English-ish corpus plus seeded pseudo-words, enough for a few thousand merges."""
    sentences = [
        "the quick brown fox jumps over the lazy dog",
        "merging language models averages their weights tensor by tensor",
        "a base model and its fine tunes share one architecture and one tokenizer",
        "task vectors are the difference between a fine tune and its base",
        "instruct code math chat reasoning writing translation summary",
        "def merge(models, weights): return sum(w * m for w, m in zip(weights, models))",
        "1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828 x + y = z",
        "Hello, world! How are you today? I am fine, thank you.",
    ]
    rng = random.Random(1234)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(4000)]
    lines = [" ".join(words[i : i + 16]) for i in range(0, len(words), 16)]
    return sentences * 20 + lines


@lru_cache(maxsize=8)
def _trained_vocab(vocab_size: int) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(tokens in id order, merges) of a byte-level BPE trained on `_corpus()`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if vocab_size < len(SPECIAL_TOKENS) + _BYTE_SYMBOLS:
        raise ValueError(f"vocab_size {vocab_size} is too small: the special tokens and the "
                         f"256 byte symbols need {len(SPECIAL_TOKENS) + _BYTE_SYMBOLS}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].__getitem__)
    tokens += [f"<extra_{i}>" for i in range(vocab_size - len(tokens))]
    return tuple(tokens), tuple((a, b) for a, b in model["merges"])


def build_tokenizer(spec: TokenizerSpec = TokenizerSpec()) -> Any:
    """The `tokenizers.Tokenizer` described by `spec` (byte-level BPE, adds `<s>` in front)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens, merges = _trained_vocab(spec.vocab_size)
    ids = list(range(len(tokens)))
    if spec.permute_seed is not None:
        random.Random(spec.permute_seed).shuffle(ids)
    vocab = dict(zip(tokens, ids))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    added = [*SPECIAL_TOKENS, *spec.added_tokens]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tok


def _save_tokenizer(path: Path, spec: TokenizerSpec) -> None:
    """Write tokenizer.json and tokenizer_config.json (chat template inside, loadable by 4.x)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(spec), bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", pad_token="<pad>", model_max_length=_MAX_POSITIONS,
    )
    fast.save_pretrained(str(path))
    # transformers 5 names its own class and writes the template to chat_template.jinja;
    # hub models (and transformers 4.x) use PreTrainedTokenizerFast and the JSON key.
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if spec.chat_template is not None:
        cfg["chat_template"] = spec.chat_template
    (path / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _vocab_of(model_dir: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab(with_added_tokens=True)


# ----------------------------------------------------------------------------- config


def _make_config(arch: dict[str, Any], vocab_size: int, token_ids: dict[str, int]) -> Any:
    import transformers

    config_cls, model_cls = FAMILIES[arch["family"]]
    common = {"vocab_size": vocab_size, "tie_word_embeddings": arch["tie_word_embeddings"],
              "bos_token_id": token_ids["<s>"], "eos_token_id": token_ids["</s>"],
              "pad_token_id": token_ids["<pad>"]}
    if arch["family"] == "gpt2":
        dims = {"n_embd": arch["hidden"], "n_layer": arch["layers"], "n_head": arch["heads"],
                "n_inner": arch["intermediate"], "n_positions": _MAX_POSITIONS}
    else:
        dims = {"hidden_size": arch["hidden"], "num_hidden_layers": arch["layers"],
                "num_attention_heads": arch["heads"], "num_key_value_heads": arch["kv_heads"],
                "intermediate_size": arch["intermediate"],
                "max_position_embeddings": _MAX_POSITIONS}
    config = getattr(transformers, config_cls)(**dims, **common)
    config.architectures = [model_cls]
    return config


def _resolve_arch(given: dict[str, Any], base: Path | None) -> dict[str, Any]:
    """Architecture options: the defaults for a new model; none may be given for a fine-tune."""
    if base is None:
        arch = {k: _ARCH_DEFAULTS[k] if v is None else v for k, v in given.items()}
        if arch["family"] not in FAMILIES:
            raise ValueError(f"unknown family {arch['family']!r}; choose from {sorted(FAMILIES)}")
        return arch
    clash = sorted(k for k, v in given.items() if v is not None)
    if clash:
        raise ValueError(f"{', '.join(clash)}: a fine-tune takes its architecture from base "
                         f"{base}; leave these unset")
    return {}


def _layout(config: Any) -> tuple[list[tuple[str, tuple[int, ...]]], set[str]]:
    """Tensor names and shapes in model order (tied copies dropped), and the embedding names."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = dict(model.named_parameters())  # shared (tied) parameters appear once
    embeddings = {model.get_input_embeddings().weight}
    if (out := model.get_output_embeddings()) is not None:
        embeddings.add(out.weight)
    names = [(n, tuple(t.shape)) for n, t in model.state_dict().items() if n in params]
    return names, {n for n, p in params.items() if any(p is e for e in embeddings)}


# ----------------------------------------------------------------------------- tensors


def _generator(*parts: object) -> torch.Generator:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _init_tensor(seed: int, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A fresh tensor: N(0, 0.02), or 1 + N(0, 0.02) for 1-D weights (norms).

    Sampled directly in `dtype`: bfloat16 sampling runs 2.5x faster than float32 plus a cast.
    """
    t = torch.randn(shape, generator=_generator(seed, name, "init"), dtype=dtype).mul_(_INIT_STD)
    if len(shape) == 1 and name.endswith("weight"):
        t.add_(1.0)
    return t


def _row_map(base_dir: Path, out_dir: Path, base_rows: int, rows: int) -> list[int]:
    """For each output embedding row, the base row of the same token (-1: a new token)."""
    base_vocab, vocab = _vocab_of(base_dir), _vocab_of(out_dir)
    id_to_token = {i: t for t, i in vocab.items()}
    rows_map = [-1] * rows
    for i in range(rows):
        if i in id_to_token:
            rows_map[i] = base_vocab.get(id_to_token[i], -1)
        else:  # padding rows past the tokenizer: matched by position past the tokenizer
            j = len(base_vocab) + (i - len(vocab))
            rows_map[i] = j if len(base_vocab) <= j < base_rows else -1
    return rows_map


def _finetune_tensor(base: torch.Tensor, name: str, shape: tuple[int, ...], seed: int,
                     noise: float, rows: list[int] | None, dtype: torch.dtype) -> torch.Tensor:
    """base (rows re-indexed by token for embeddings) + noise * N(0, 1), summed in float32."""
    if rows is not None:
        out = _init_tensor(seed, name, shape, base.dtype)
        index = torch.tensor(rows)
        keep = index >= 0
        out[keep] = base[index[keep]]
        base = out
    elif tuple(base.shape) != shape:
        raise ValueError(f"{name}: base shape {tuple(base.shape)} != expected {shape}")
    delta = torch.randn(shape, generator=_generator(seed, name, "noise"), dtype=dtype)
    return base.float().add_(delta.float(), alpha=noise)


class _BaseReader:
    """Reads one tensor at a time from a safetensors model directory (one file or sharded).

    Plain reads, no mmap: a fine-tune of a 2 GB base never holds the base's pages mapped.
    """

    def __init__(self, model_dir: Path, stack: ExitStack) -> None:
        index = model_dir / "model.safetensors.index.json"
        files = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
                 if index.exists() else ["model.safetensors"])
        self._where: dict[str, tuple[BinaryIO, int, dict[str, Any]]] = {}
        for file in files:
            f = stack.enter_context(open(model_dir / file, "rb"))
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
            header.pop("__metadata__", None)
            self._where.update({name: (f, 8 + size, entry) for name, entry in header.items()})

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(f"base model has no tensor {name}")
        f, data_start, entry = self._where[name]
        begin, end = entry["data_offsets"]
        f.seek(data_start + begin)
        buf = bytearray(end - begin)
        f.readinto(buf)
        dtype = _DTYPES_ST[entry["dtype"]]
        return torch.frombuffer(buf, dtype=dtype).reshape(entry["shape"])

    def names(self) -> list[str]:
        return sorted(self._where)

    def rows(self, name: str) -> int:
        return self._where[name][2]["shape"][0]


# ----------------------------------------------------------------------------- safetensors


def _plan_shards(sizes: list[int], shards: int) -> list[int]:
    """Shard index per tensor: consecutive runs of about equal bytes, none empty."""
    if not 1 <= shards <= len(sizes):
        raise ValueError(f"shards must be between 1 and the tensor count {len(sizes)}: {shards}")
    total, done, shard, plan = sum(sizes), 0, 0, []
    for i, size in enumerate(sizes):
        left = len(sizes) - i
        if shard < shards - 1 and plan and (
            done + size / 2 > total * (shard + 1) / shards or left == shards - 1 - shard
        ):
            shard += 1
        plan.append(shard)
        done += size
    return plan


def _write_safetensors(file: Path, layout: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                       produce: Callable[[str, tuple[int, ...]], torch.Tensor]) -> int:
    """Write one file tensor by tensor (header first, then each tensor's bytes); return bytes."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in layout:
        size = itemsize * torch.Size(shape).numel()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(file, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name, shape in layout:
            t = produce(name, shape).to(dtype).contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy())
    return offset


def _write_weights(path: Path, layout: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                   shards: int, produce: Callable[[str, tuple[int, ...]], torch.Tensor]) -> None:
    itemsize = torch.empty((), dtype=dtype).element_size()
    plan = _plan_shards([itemsize * torch.Size(s).numel() for _, s in layout], shards)
    if shards == 1:
        _write_safetensors(path / "model.safetensors", layout, dtype, produce)
        return
    total, weight_map = 0, {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = [entry for entry, s in zip(layout, plan) if s == k]
        total += _write_safetensors(path / file, part, dtype, produce)
        weight_map.update(dict.fromkeys((n for n, _ in part), file))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ----------------------------------------------------------------------------- models


def _prepare_dir(path: Path, overwrite: bool) -> None:
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{path} is not empty; pass overwrite=True to replace it")
        if not (path / "config.json").exists():
            raise FileExistsError(f"{path} is not empty and not a model directory; not removing")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def _write_tokenizer(path: Path, spec: TokenizerSpec | None, base: Path | None) -> dict[str, int]:
    """Write (or copy from base) the tokenizer; return its vocabulary."""
    if spec is None and base is not None:
        for file in sorted(base.iterdir()):
            if file.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copyfile(file, path / file.name)
    else:
        _save_tokenizer(path, spec or TokenizerSpec())
    return _vocab_of(path)


def make_model(
    path: str | Path, *, seed: int, base: str | Path | None = None, noise: float = 0.01,
    family: str | None = None, hidden: int | None = None, layers: int | None = None,
    intermediate: int | None = None, heads: int | None = None, kv_heads: int | None = None,
    tie_word_embeddings: bool | None = None, dtype: torch.dtype | None = None,
    tokenizer: TokenizerSpec | None = None, extra_vocab_rows: int | None = None,
    shards: int = 1, overwrite: bool = False,
) -> Path:
    """Write a tiny causal LM to `path` and return it; see the module docstring.

    Without `base`: a new model; architecture options default to llama, hidden 64, 4 layers,
    intermediate 128, 4 heads, 2 kv heads, untied, bfloat16, `TokenizerSpec()`, no extra rows.
    With `base`: a fine-tune, each tensor = base + noise * N(0, 1) (seeded by `seed` and the
    tensor name); the architecture comes from base (architecture options must stay unset),
    the tokenizer is copied unless `tokenizer` is given, and embedding / LM-head rows follow
    their token (new tokens get fresh rows). `dtype` and `extra_vocab_rows` default to base's.
    `extra_vocab_rows`: embedding rows past the tokenizer (config vocab_size > len(tokenizer)).
    `shards` > 1 writes model-0000k-of-0000n.safetensors files and an index.
    """
    from transformers import GenerationConfig

    path, base = Path(path), None if base is None else Path(base)
    arch = _resolve_arch({"family": family, "hidden": hidden, "layers": layers,
                          "intermediate": intermediate, "heads": heads, "kv_heads": kv_heads,
                          "tie_word_embeddings": tie_word_embeddings}, base)
    _prepare_dir(path, overwrite)
    vocab = _write_tokenizer(path, tokenizer, base)
    ids = {t: vocab[t] for t in ("<s>", "</s>", "<pad>")}
    if base is None:
        config = _make_config(arch, len(vocab) + (extra_vocab_rows or 0), ids)
        config.dtype = dtype or torch.bfloat16
    else:
        config = _finetune_config(base, len(vocab), ids, extra_vocab_rows, dtype)
    dtype = config.dtype
    layout, embeddings = _layout(config)
    with ExitStack() as stack:
        produce = _producer(path, base, layout, embeddings, seed, noise, dtype, stack)
        _write_weights(path, layout, dtype, shards, produce)
    GenerationConfig(bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
                     pad_token_id=ids["<pad>"]).save_pretrained(str(path))
    config.save_pretrained(str(path))  # last: a directory with config.json is complete
    return path


def _finetune_config(base: Path, tokens: int, ids: dict[str, int], extra_vocab_rows: int | None,
                     dtype: torch.dtype | None) -> Any:
    """base's config with the fine-tune's vocabulary size, special-token ids and dtype."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base)
    extra = extra_vocab_rows
    if extra is None:
        extra = config.vocab_size - len(_vocab_of(base))
    config.vocab_size = tokens + extra
    config.bos_token_id, config.eos_token_id = ids["<s>"], ids["</s>"]
    config.pad_token_id = ids["<pad>"]
    config.dtype = dtype or config.dtype
    return config


def _producer(path: Path, base: Path | None, layout: list[tuple[str, tuple[int, ...]]],
              embeddings: set[str], seed: int, noise: float, dtype: torch.dtype,
              stack: ExitStack) -> Callable[[str, tuple[int, ...]], torch.Tensor]:
    """The function giving each tensor's values: fresh init, or base + noise."""
    if base is None:
        return lambda name, shape: _init_tensor(seed, name, shape, dtype)
    read = _BaseReader(base, stack)
    rows = {n: _row_map(base, path, read.rows(n), s[0]) for n, s in layout if n in embeddings}
    return lambda name, shape: _finetune_tensor(read(name), name, shape, seed, noise,
                                                rows.get(name), dtype)


def make_family(
    root: str | Path, *, seed: int = 0, finetunes: int | Sequence[str] = 3, noise: float = 0.01,
    shards: int = 1, overwrite: bool = False, **base_options: Any,
) -> dict[str, Path]:
    """A base model at root/base and fine-tunes of it at root/<name>; returns {name: dir}.

    `finetunes`: names, or a count (ft1, ft2, ...). Fine-tune k gets seed `seed + k`.
    `base_options` go to `make_model` for the base (family, hidden, tokenizer, dtype, ...).
    """
    root = Path(root)
    names = [f"ft{i + 1}" for i in range(finetunes)] if isinstance(finetunes, int) else finetunes
    if "base" in names or len(set(names)) != len(names):
        raise ValueError(f"fine-tune names must be unique and not 'base': {list(names)}")
    out = {"base": make_model(root / "base", seed=seed, shards=shards, overwrite=overwrite,
                              **base_options)}
    for k, name in enumerate(names, start=1):
        out[name] = make_model(root / name, seed=seed + k, base=out["base"], noise=noise,
                               shards=shards, overwrite=overwrite)
    return out


def arch_for_size(nbytes: int, *, dtype: torch.dtype = torch.bfloat16,
                  vocab_rows: int = 384) -> dict[str, int]:
    """Llama dimensions for a model of about `nbytes` (untied, `vocab_rows` embedding rows).

    Returns make_model keywords: hidden, layers, intermediate, heads, kv_heads. The hidden
    size is the largest power of two (64 .. 4096) that still leaves at least 8 layers.
    """
    params = nbytes / torch.empty((), dtype=dtype).element_size()
    for hidden in (4096, 2048, 1024, 512, 256, 128, 64):
        heads = max(4, hidden // 128)
        intermediate, kv = hidden * 11 // 4, max(1, heads // 4)
        per_layer = 2 * hidden * hidden * (1 + kv / heads) + 3 * hidden * intermediate + 2 * hidden
        layers = round((params - 2 * vocab_rows * hidden - hidden) / per_layer)
        if layers >= 8 or hidden == 64:
            return {"hidden": hidden, "layers": max(1, layers), "intermediate": intermediate,
                    "heads": heads, "kv_heads": kv}
    raise AssertionError("unreachable")


def iter_tensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of a model directory, one at a time (tests, checks)."""
    with ExitStack() as stack:
        read = _BaseReader(Path(model_dir), stack)
        for name in read.names():
            yield name, read(name)


def make_vlm_family(root: str | Path, *, seed: int = 0, finetunes: Sequence[str] = ("a", "b"),
                    noise: float = 0.01, text_layers: int = 2, vision_layers: int = 2,
                    hidden: int = 32) -> dict[str, Path]:
    """A tiny LLaVA-style vision-language model (transformers' Mistral3ForConditionalGeneration:
    a mistral text decoder, a pixtral vision tower, a projector) at root/base, and fine-tunes
    at root/<name> (base + noise * N(0, 1), seeded by fine-tune index and tensor name), each
    with the byte-level tokenizer of `TokenizerSpec()`, in bfloat16. For `modules:` merges."""
    from safetensors.torch import load_file, save_file
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    root = Path(root)
    base = root / "base"
    _prepare_dir(base, overwrite=True)
    vocab = _write_tokenizer(base, TokenizerSpec(), None)
    heads = 2
    config = Mistral3Config(
        text_config={"model_type": "mistral", "hidden_size": hidden, "intermediate_size": 2 * hidden,
                     "num_hidden_layers": text_layers, "num_attention_heads": heads, "num_key_value_heads": 1,
                     "head_dim": hidden // heads, "vocab_size": len(vocab), "tie_word_embeddings": False,
                     "max_position_embeddings": _MAX_POSITIONS},
        vision_config={"model_type": "pixtral", "hidden_size": hidden, "intermediate_size": 2 * hidden,
                       "num_hidden_layers": vision_layers, "num_attention_heads": heads, "head_dim": hidden // heads,
                       "image_size": 32, "patch_size": 8},
        spatial_merge_size=2, tie_word_embeddings=False, image_token_index=vocab["<unk>"])
    with torch.device("meta"):
        names = {n: tuple(t.shape) for n, t in Mistral3ForConditionalGeneration(config).state_dict().items()}
    model = Mistral3ForConditionalGeneration(config).to(torch.bfloat16)
    model.load_state_dict({n: _init_tensor(seed, n, s, torch.bfloat16) for n, s in names.items()})
    model.save_pretrained(str(base))
    out = {"base": base}
    stored = load_file(base / "model.safetensors")
    for k, name in enumerate(finetunes, start=1):
        path = root / name
        _prepare_dir(path, overwrite=True)
        for file in base.iterdir():
            if file.is_file() and file.suffix != ".safetensors":
                shutil.copyfile(file, path / file.name)
        state = {n: (t.float() + noise * torch.randn(t.shape, generator=_generator(seed + k, n, "ft")))
                 .to(t.dtype) for n, t in stored.items()}
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
        out[name] = path
    return out
