"""The output tokenizer, built while planning (METHODS.md, "Tokenizers and embeddings").

`plan_tokenizer` reads every input's tokenizer (tokenizer.json; other formats through
transformers) and returns a TokenizerPlan, the files the output gets, plus, when the config
sets `tokenizer_source` or a `tokenizer:` block, a TokenizerBuild: the output vocabulary and
each model's token -> row map, from which vocab.py aligns every embedding and LM head.

- base: the base (or first) model's tokenizer, without tokens whose id is >= its vocab_size.
- union: that, then every other model's regular tokens it lacks (BPE: with the merges that
  build them, so they are reachable), in model order, then their added tokens.
- a model: that model's tokenizer, without tokens beyond its vocab_size.
`tokens:` entries not in the vocabulary are appended as added tokens; rows are padded up to
`pad_to_multiple_of`. Without a tokenizer setting the reference model's files are copied.
The chat template (chat_templates.py) goes into tokenizer_config.json and chat_template.jinja.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergeflow.errors import MergeflowError
from mergeflow.sources.files import load_json
from mergeflow.sources.models import ModelInfo, resolve_model_path
from mergeflow.spec.chat_templates import choose_template, marker_warnings
from mergeflow.spec.config import MergeConfig, ModelRef, TokenEmbedding

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
KEPT_WITH_NEW_VOCAB = ("special_tokens_map.json", "chat_template.jinja", "chat_template.json")
SPECIAL_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclass(frozen=True)
class TokenizerPlan:
    """What the output directory gets besides the tensors, decided before the merge."""

    source: str  # "union", "base", a model label, or "copied from <model>" (no tokenizer setting)
    files: tuple[tuple[str, bytes], ...] = ()  # (file name, content), written by output.py
    max_id: int | None = None  # the largest token id of the saved tokenizer (None: unknown)
    rows: int | None = None  # output vocabulary rows (padding included); None: not aligned
    chat_template: str | None = None
    warnings: tuple[str, ...] = ()


@dataclass
class TokenizerBuild:
    """The output vocabulary and every model's tokens, for aligning vocab tensors."""

    vocab: dict[str, int]  # output token -> id
    rows: int
    models: list[dict[str, int]]  # per plan model: token -> row (ids below its vocab_size)
    full: list[dict[str, int]]  # per plan model: its tokenizer's whole vocabulary
    tokens: dict[str, TokenEmbedding] = field(default_factory=dict)  # the `tokens:` entries
    index: dict[str, int] = field(default_factory=dict)  # model label -> plan model index
    where: Callable[[tuple], str] = str  # config location (`file:line:col`) of a YAML path
    cache: dict[tuple[int, int], list[int]] = field(default_factory=dict, repr=False)  # vocab.py's


@dataclass
class _Source:
    """One tokenizer as read from a model directory."""

    label: str
    path: Path
    data: dict[str, Any] | None  # tokenizer.json content (None: the model has no tokenizer)
    vocab: dict[str, int]  # every token -> id
    limit: int  # ids below this have embedding rows


def tokenizer_setting(config: MergeConfig) -> str | ModelRef | None:
    if config.tokenizer is not None:
        return config.tokenizer.source
    return config.tokenizer_source


def plan_tokenizer(config: MergeConfig, models: list[ModelInfo], index: dict[str, int],
                   reference: int, embed_names: tuple[str, ...], *,
                   trust_remote_code: bool = False) -> tuple[TokenizerPlan, TokenizerBuild | None]:
    """The output tokenizer's files and, with a tokenizer setting, the alignment data.

    `trust_remote_code` is passed to transformers only where a model has no tokenizer.json
    and its tokenizer must be converted (--trust-remote-code; off by default)."""
    warnings: list[str] = []
    template = choose_template(config.chat_template, [Path(m.path) for m in models], warnings)
    setting = tokenizer_setting(config)
    if setting is None:
        return _copy_plan(config, models, reference, embed_names, template, warnings,
                          trust_remote_code), None
    sources = [_read_source(m, embed_names, trust_remote_code) for m in models]
    for s in sources:
        if s.data is None:
            warnings.append(f"model {s.label} has no tokenizer; its rows are taken to follow the "
                            f"tokenizer of {sources[reference].label}")
            s.data, s.vocab = sources[reference].data, sources[reference].vocab
    out, origin = _output_tokenizer(config, setting, sources, reference, trust_remote_code)
    tokens = dict(config.tokenizer.tokens or {}) if config.tokenizer else {}
    _add_tokens(out, [t for t in tokens if t not in _vocab_of(out)])
    vocab = loaded_vocab(out)
    rows = _padded(max(vocab.values()) + 1, config.tokenizer.pad_to_multiple_of if config.tokenizer else None)
    files = _files(origin.path, None if vocab == origin.vocab else out, template)
    files += _generation_config(sources[reference], vocab)
    warnings += marker_warnings(config.chat_template, vocab)
    build = TokenizerBuild(vocab, rows, [_limited(s) for s in sources], [s.vocab for s in sources],
                           tokens, dict(index), config.where)
    label = setting if isinstance(setting, str) else str(setting)
    return TokenizerPlan(label, files, max(vocab.values()), rows, template, tuple(warnings)), build


def _copy_plan(config: MergeConfig, models: list[ModelInfo], reference: int, embed_names: tuple[str, ...],
               template: str | None, warnings: list[str], trust_remote_code: bool) -> TokenizerPlan:
    """No tokenizer setting: the reference's files as they are (its ids are checked later)."""
    ref = models[reference]
    try:
        source = _read_source(ref, embed_names, trust_remote_code)
        vocab = source.vocab
        warnings += _renumbered(source, [m for m in models if m.path != ref.path], embed_names)
    except MergeflowError as e:
        warnings.append(f"{e}; the tokenizer files are copied unchecked")
        vocab = {}
    warnings += marker_warnings(config.chat_template, vocab) if vocab else []
    max_id = max(vocab.values()) if vocab else None
    return TokenizerPlan(f"copied from {ref.label}", _files(Path(ref.path), None, template), max_id,
                         None, template, tuple(warnings))


def _renumbered(ref: _Source, others: list[ModelInfo], embed_names: tuple[str, ...]) -> list[str]:
    """A warning naming the models whose token ids (below both vocab sizes) differ from ref's."""
    ref_file = tokenizer_file(ref.path)
    ref_bytes = ref_file.read_bytes() if ref_file else b""
    differ = []
    for m in others:
        file = tokenizer_file(Path(m.path))
        if file is None or file.read_bytes() == ref_bytes:
            continue
        vocab = loaded_vocab(None, file)
        limit = min(ref.limit, _limit(m.config, m, embed_names, vocab))
        if {t: i for t, i in vocab.items() if i < limit} != {t: i for t, i in ref.vocab.items() if i < limit}:
            differ.append(m.label)
    if not differ:
        return []
    return [f"the tokenizers of {', '.join(differ)} number tokens differently from {ref.label}'s, which is "
            "copied: their embedding rows are merged by id, not by token. Set `tokenizer_source: union` "
            "(or base, or a model) to align them by token"]


# ----------------------------------------------------------------------------- reading


def _read_source(model: ModelInfo, embed_names: tuple[str, ...], trust_remote_code: bool) -> _Source:
    path = Path(model.path)
    data = read_tokenizer_json(path, trust_remote_code)
    vocab = loaded_vocab(data, tokenizer_file(path)) if data is not None else {}
    return _Source(model.label, path, data, vocab, _limit(model.config, model, embed_names, vocab))


def _limit(config: dict, model: ModelInfo | None, embed_names: tuple[str, ...], vocab: dict) -> int:
    """Token ids below this have rows: min(config vocab_size, embedding rows), if known."""
    bounds = [config["vocab_size"]] if isinstance(config.get("vocab_size"), int) else []
    if model is not None:
        bounds += [model.tensors[n].shape[0] for n in embed_names if n in model.tensors][:1]
    return min(bounds) if bounds else (max(vocab.values()) + 1 if vocab else 0)


def read_tokenizer_json(path: Path, trust_remote_code: bool = False) -> dict[str, Any] | None:
    """A model directory's tokenizer as tokenizer.json data (converted by transformers if needed)."""
    file = path / "tokenizer.json"
    if file.is_file():
        return load_json(file, "tokenizer")
    if not any((path / n).is_file() for n in ("tokenizer.model", "vocab.json", "tokenizer_config.json")):
        return None
    try:
        from transformers import AutoTokenizer

        backend = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code).backend_tokenizer
        return json.loads(backend.to_str())
    except Exception as e:  # noqa: BLE001 (any failure here means: no usable fast tokenizer)
        raise MergeflowError(f"{path}: has no tokenizer.json and transformers cannot convert its "
                             f"tokenizer ({type(e).__name__}: {e}); add a tokenizer.json") from None


def _vocab_of(data: dict[str, Any]) -> dict[str, int]:
    """token -> id as tokenizer.json data lists them (cheap; for building)."""
    vocab = data["model"].get("vocab") or {}
    out = {p[0]: i for i, p in enumerate(vocab)} if isinstance(vocab, list) else dict(vocab)
    out.update({a["content"]: a["id"] for a in data.get("added_tokens", [])})
    return out


def loaded_vocab(data: dict[str, Any] | None, file: Path | None = None) -> dict[str, int]:
    """token -> id as the tokenizers library (so transformers) numbers them: the ids that count."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(file)) if file is not None else Tokenizer.from_str(json.dumps(data))
    except Exception as e:  # noqa: BLE001 (the library raises plain Exceptions)
        raise MergeflowError(f"{file or 'the output tokenizer'}: the tokenizers library cannot load it: {e}") from None
    return tok.get_vocab(with_added_tokens=True)


def tokenizer_file(path: Path) -> Path | None:
    return path / "tokenizer.json" if (path / "tokenizer.json").is_file() else None


def _limited(source: _Source) -> dict[str, int]:
    return {t: i for t, i in source.vocab.items() if i < source.limit}


def _find_source(ref: ModelRef, sources: list[_Source], trust_remote_code: bool) -> _Source:
    for s in sources:
        if s.label == str(ref):
            return s
    path = resolve_model_path(ref, what="tokenizer_source")
    data = read_tokenizer_json(path, trust_remote_code)
    if data is None:
        raise MergeflowError(f"tokenizer_source {ref}: {path} has no tokenizer")
    config_file = path / "config.json"
    config = load_json(config_file, "model config") if config_file.is_file() else {}
    vocab = loaded_vocab(data, tokenizer_file(path))
    return _Source(str(ref), path, data, vocab, _limit(config, None, (), vocab))


# ----------------------------------------------------------------------------- building


def _output_tokenizer(config: MergeConfig, setting: str | ModelRef, sources: list[_Source],
                      reference: int, trust_remote_code: bool) -> tuple[dict[str, Any], _Source]:
    """(tokenizer.json data of the output, the source whose other files it keeps)."""
    origin = sources[reference] if isinstance(setting, str) else _find_source(setting, sources, trust_remote_code)
    if origin.data is None:
        raise MergeflowError(f"{config.path}: model {origin.label} has no tokenizer to build the "
                             "output tokenizer from; set `tokenizer_source` to a model that has one")
    out = json.loads(json.dumps(origin.data))
    _strip(out, origin.limit)
    if setting == "union":
        others = [s for i, s in enumerate(sources) if i != reference and s.data is not None]
        _union(out, others, config)
    return out, origin


def _pair(merge: Any) -> tuple[str, str]:
    return (merge[0], merge[1]) if isinstance(merge, list) else tuple(merge.split(" ", 1))


def _merged(model: dict[str, Any], a: str, b: str) -> str:
    prefix = model.get("continuing_subword_prefix") or ""
    return a + (b[len(prefix):] if prefix and b.startswith(prefix) else b)


def _strip(data: dict[str, Any], limit: int) -> None:
    """Drop tokens with id >= limit (no embedding row), and merges that involve them."""
    model = data["model"]
    gone: set[str] = set()
    if isinstance(model.get("vocab"), dict):
        gone = {t for t, i in model["vocab"].items() if i >= limit}
        model["vocab"] = {t: i for t, i in model["vocab"].items() if i < limit}
    elif isinstance(model.get("vocab"), list):  # Unigram: ids are positions
        gone = {piece[0] for piece in model["vocab"][limit:]}
        model["vocab"] = model["vocab"][:limit]
    if gone and "merges" in model:
        model["merges"] = [m for m in model["merges"] if not (
            set(_pair(m)) & gone or _merged(model, *_pair(m)) in gone)]
    data["added_tokens"] = [a for a in data.get("added_tokens", []) if a["id"] < limit]


def _union(out: dict[str, Any], others: list[_Source], config: MergeConfig) -> None:
    """Append the other models' regular tokens (and merges), then their added tokens."""
    vocab = _vocab_of(out)
    next_id = max(vocab.values()) + 1
    new: dict[str, int] = {}
    for s in others:
        added = {a["content"] for a in s.data.get("added_tokens", [])}
        for tok, i in sorted(_regular(s.data).items(), key=lambda kv: kv[1]):
            if i < s.limit and tok not in added and tok not in vocab and tok not in new:
                new[tok], next_id = next_id, next_id + 1
    if new:
        _append_regular(out, new, others, config)
    vocab = _vocab_of(out)
    for s in others:
        for entry in sorted(s.data.get("added_tokens", []), key=lambda a: a["id"]):
            if entry["id"] < s.limit and entry["content"] not in vocab:
                out.setdefault("added_tokens", []).append({**entry, "id": next_id})
                vocab[entry["content"]], next_id = next_id, next_id + 1


def _regular(data: dict[str, Any]) -> dict[str, int]:
    vocab = data["model"].get("vocab")
    if isinstance(vocab, list):
        return {piece[0]: i for i, piece in enumerate(vocab)}
    return dict(vocab or {})


def _append_regular(out: dict[str, Any], new: dict[str, int], others: list[_Source],
                    config: MergeConfig) -> None:
    """Put new tokens into the model vocabulary, after ids the added tokens already hold.

    The tokenizers library numbers the model vocabulary 0..n-1 and added tokens after it, so the
    base's added tokens move into the model vocabulary (same ids) before new ids are appended.
    """
    model = out["model"]
    if model.get("type") != "BPE":
        raise MergeflowError(
            f"{config.path}: tokenizer_source union would add {len(new)} regular tokens (first "
            f"{next(iter(new))!r}) to a {model.get('type')} tokenizer; mergeflow extends BPE "
            "vocabularies only. Use `tokenizer_source: base` or a model instead")
    for entry in out.get("added_tokens", []):
        model["vocab"].setdefault(entry["content"], entry["id"])
    model["vocab"].update(new)
    have = {_pair(m) for m in model.get("merges", [])}
    as_list = bool(model.get("merges")) and isinstance(model["merges"][0], list)
    for s in others:
        other = s.data["model"]
        for m in other.get("merges", []) if other.get("type") == "BPE" else []:
            a, b = _pair(m)
            if (a, b) not in have and _merged(other, a, b) in new and a in model["vocab"] and b in model["vocab"]:
                model.setdefault("merges", []).append([a, b] if as_list else f"{a} {b}")
                have.add((a, b))


def _add_tokens(out: dict[str, Any], tokens: list[str]) -> None:
    """`tokens:` entries the vocabulary lacks become (non-special) added tokens."""
    if not tokens:
        return
    next_id = max(_vocab_of(out).values()) + 1
    for i, tok in enumerate(tokens):
        out.setdefault("added_tokens", []).append(
            {"id": next_id + i, "content": tok, "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": True, "special": False})


def _padded(n: int, multiple: int | None) -> int:
    return -(-n // multiple) * multiple if multiple else n


# ----------------------------------------------------------------------------- files


def _read_config(path: Path) -> dict[str, Any]:
    file = path / "tokenizer_config.json"
    return load_json(file, "tokenizer config") if file.is_file() else {}


def _dump(data: Any) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()


def _files(path: Path, out: dict[str, Any] | None, template: str | None) -> tuple[tuple[str, bytes], ...]:
    """The source's tokenizer files (or, with a rebuilt `out`, tokenizer.json and the files
    that stay valid), tokenizer_config.json's added tokens to match, the chat template set."""
    names = TOKENIZER_FILES if out is None else KEPT_WITH_NEW_VOCAB
    files = {n: (path / n).read_bytes() for n in names if (path / n).is_file()}
    cfg = None
    if out is not None:
        files["tokenizer.json"] = _dump(out)
        cfg = _read_config(path)
        if "added_tokens_decoder" in cfg:
            keys = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
            cfg["added_tokens_decoder"] = {str(a["id"]): {k: a[k] for k in keys if k in a} for a in
                                           sorted(out.get("added_tokens", []), key=lambda a: a["id"])}
    if template is not None:
        cfg = _read_config(path) if cfg is None else cfg
        cfg["chat_template"] = template
        files["chat_template.jinja"] = template.encode()
        files.pop("chat_template.json", None)
    if cfg is not None:
        files["tokenizer_config.json"] = _dump(cfg)
    return tuple(files.items())


# ----------------------------------------------------------------------------- config and checks


def remap_special_ids(config: dict[str, Any], old: dict[str, int], new: dict[str, int]) -> list[str]:
    """Point bos/eos/pad ids of `config` (in place) at the same tokens in the new vocabulary."""
    by_id = {i: t for t, i in old.items()}
    warnings = []

    def remap(key: str, i: Any) -> Any:
        if not isinstance(i, int) or isinstance(i, bool) or by_id.get(i) is None:
            return i
        if by_id[i] not in new:
            warnings.append(f"config {key} {i} ({by_id[i]!r}) is not in the output tokenizer; left as is")
            return i
        return new[by_id[i]]

    for key in SPECIAL_ID_KEYS:
        value = config.get(key)
        if value is not None:
            config[key] = [remap(key, v) for v in value] if isinstance(value, list) else remap(key, value)
    return warnings


def _generation_config(ref: _Source, vocab: dict[str, int]) -> tuple[tuple[str, bytes], ...]:
    """The reference's generation_config.json with its special-token ids moved to the output's."""
    file = ref.path / "generation_config.json"
    try:
        gen = load_json(file, "generation config") if file.is_file() else None
    except MergeflowError:
        return ()  # copied as it is (output.py), as without a tokenizer setting
    if gen is None:
        return ()
    before = json.dumps(gen)
    remap_special_ids(gen, ref.vocab, vocab)
    return () if json.dumps(gen) == before else (("generation_config.json", _dump(gen)),)
