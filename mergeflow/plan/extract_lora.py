"""Plan a LoRA extraction (`mergeflow extract-lora`): which modules, their ranks, the adapter file.

Pure data, no tensor bytes. The fine-tune's modules (sources/modules.py) are sorted as
mergekit-extract-lora sorts them, in the model's module order:
- a module named by --save-module (its last name part or its full name) is saved whole:
  weight and bias copied from the fine-tune (PEFT's `modules_to_save`);
- embeddings (the input and output embeddings and every nn.Embedding) join them unless
  --embed-lora, or the vocabularies differ, or an --exclude-regex names them;
- of the rest, those the include/exclude patterns keep: a Linear (and, with --embed-lora, an
  nn.Embedding, transposed) becomes a LoRA: the SVD of (fine-tune - base) cut to its rank;
  anything else (norms, GPT-2's Conv1D) has no LoRA form and is saved whole, or left out with
  --skip-undecomposable.
A LoRA module's rank is min(--max-rank, the smaller side of its weight), known from the
headers, so the adapter file is laid out here. With --sv-epsilon the ranks depend on the
singular values: `layout` is called once the factors are computed, with their ranks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field

from mergeflow import __version__
from mergeflow.dtypes import TORCH_TO_CODE
from mergeflow.errors import MergeflowError
from mergeflow.plan.shards import ShardPlan, encode_header, tensor_nbytes
from mergeflow.sources.lora import PREFIX
from mergeflow.sources.models import ModelInfo, TensorInfo, read_model
from mergeflow.sources.modules import Module, model_modules
from mergeflow.spec.config import ModelRef

LORA, EMBEDDING, SAVE = "lora", "embedding", "save"
ADAPTER_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class ExtractOptions:
    """mergekit-extract-lora's options, as `mergeflow extract-lora` takes them."""

    max_rank: int = 128
    sv_epsilon: float = 0.0  # singular values at or below it are dropped
    distribute_scale: bool = True  # A = sqrt(S) Vh, B = U sqrt(S); off: A = S Vh, B = U
    embed_lora: bool = False  # embeddings become LoRAs instead of modules_to_save
    modules_to_save: tuple[str, ...] = ()
    include: tuple[str, ...] = ()  # regexes searched in module names
    exclude: tuple[str, ...] = ()
    skip_undecomposable: bool = False
    trust_remote_code: bool = False


@dataclass(frozen=True)
class ModulePlan:
    """One module of the adapter: a LoRA (of the weight, or of an embedding's transpose) or
    a module saved whole."""

    name: str
    kind: str  # LORA, EMBEDDING or SAVE
    weight: TensorInfo  # the fine-tune's
    base: TensorInfo | None = None  # the base's (LoRA kinds)
    bias: TensorInfo | None = None  # the fine-tune's, copied whole
    cap: int = 0  # the largest rank this LoRA can have
    out_dtype: str = ""  # the factors' torch dtype: the fine-tune's and base's, promoted

    @property
    def key(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def delta_shape(self) -> tuple[int, int]:
        """The matrix decomposed: the weight's change, transposed for an embedding (PEFT's
        lora_embedding_B @ lora_embedding_A is (dim, vocab))."""
        rows, cols = self.weight.shape
        return (cols, rows) if self.kind == EMBEDDING else (rows, cols)


@dataclass(frozen=True)
class AdapterTensor:
    """One tensor of adapter_model.safetensors and its absolute byte range there."""

    name: str
    module: str
    part: str  # "A", "B" (a LoRA's factors) or "copy" (a fine-tune tensor saved whole)
    dtype: str  # torch dtype name
    shape: tuple[int, ...]
    source: TensorInfo | None = None  # the bytes to copy (None: factors the SVD task writes)
    begin: int = 0
    end: int = 0

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class ExtractPlan:
    finetune: ModelInfo
    base: ModelInfo
    options: ExtractOptions
    modules: tuple[ModulePlan, ...]
    modules_to_save: tuple[str, ...]  # adapter_config.json's list, in mergekit's order
    others: tuple[str, ...]  # modules with a weight and no LoRA (PEFT must not target them)
    vocab: tuple[int | None, int | None] = (None, None)  # (base, fine-tune) embedding rows
    notes: tuple[str, ...] = ()
    tied_saved: bool = False  # the LM head is the input embedding, and both are saved whole
    fingerprint: str = ""
    ranks: dict[str, int] | None = None  # per LoRA module; None until counted (--sv-epsilon)
    tensors: tuple[AdapterTensor, ...] = ()
    shard: ShardPlan | None = None

    @property
    def models(self) -> tuple[ModelInfo, ModelInfo]:
        return self.finetune, self.base

    @property
    def shards(self) -> tuple[ShardPlan, ...]:
        return (self.shard,) if self.shard is not None else ()

    @property
    def loras(self) -> tuple[ModulePlan, ...]:
        return tuple(m for m in self.modules if m.kind != SAVE)

    @property
    def bytes_written(self) -> int:
        return self.shard.size if self.shard is not None else 0


def plan_extraction(finetune: ModelRef | str | os.PathLike, base: ModelRef | str | os.PathLike,
                    options: ExtractOptions, *, allow_download: bool = True) -> ExtractPlan:
    """Read both models' headers and the fine-tune's module table; sort the modules and, when
    the ranks follow from the shapes, lay out the adapter."""
    _check_options(options)
    ft = read_model(_ref(finetune, "--model"), allow_download=allow_download)
    bm = read_model(_ref(base, "--base-model"), allow_download=allow_download)
    table = model_modules(ft.path, ft.label, trust_remote_code=options.trust_remote_code)
    vocab = (_vocab_rows(table, bm), _vocab_rows(table, ft))
    sorter = _Sorter(options, ft, bm, embed_lora=options.embed_lora and vocab[0] == vocab[1])
    for module in table:
        sorter.add(module)
    if sorter.problems:
        raise MergeflowError(f"cannot extract a LoRA from {ft.label} over {bm.label}:\n"
                             + "\n".join(f"  - {p}" for p in sorter.problems))
    loras = [m for m in sorter.planned if m.kind != SAVE]
    if not loras:
        raise MergeflowError(_nothing_to_decompose(ft.label, table, options))
    planned = {m.name for m in loras}
    saved = {m.name for m in sorter.planned if m.kind == SAVE}
    tied = [m for m in table if m.vocab and len(m.weight) > 1]  # a head stored as the embedding
    plan = ExtractPlan(ft, bm, options, tuple(sorter.planned), tuple(sorter.save),
                       tuple(m.name for m in table if m.name not in planned), vocab,
                       sorter.notes(vocab), tied_saved=bool(tied) and all(m.name in saved for m in tied))
    plan = _with_fingerprint(plan)
    if options.sv_epsilon > 0:
        return plan
    return layout(plan, {m.name: m.cap for m in loras})


def _nothing_to_decompose(label: str, table: list[Module], options: ExtractOptions) -> str:
    if options.include or options.exclude or options.modules_to_save:
        return (f"no module of {label} is left to decompose: the include/exclude patterns and "
                "--save-module leave no Linear layer; check -i/-e/--save-module")
    kinds = ", ".join(dict.fromkeys(m.type_name for m in table if not m.vocab))
    return (f"{label} has no Linear layer to decompose besides its embeddings (its other modules "
            f"with weights: {kinds}); "
            "mergeflow extract-lora makes LoRAs of nn.Linear layers (and nn.Embedding with --embed-lora)")


def _ref(value: ModelRef | str | os.PathLike, flag: str) -> ModelRef:
    try:
        return value if isinstance(value, ModelRef) else ModelRef.parse(os.fspath(value))
    except ValueError as e:
        raise MergeflowError(f"{flag} {value!r}: {e}") from None


def _check_options(options: ExtractOptions) -> None:
    if options.max_rank < 1:
        raise MergeflowError(f"--max-rank {options.max_rank}: the rank must be at least 1")
    if not options.sv_epsilon >= 0:
        raise MergeflowError(f"--sv-epsilon {options.sv_epsilon}: must be 0 (keep every singular "
                             "value up to --max-rank) or more")
    for flag, patterns in (("--include-regex", options.include), ("--exclude-regex", options.exclude)):
        for p in patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise MergeflowError(f"{flag} {p!r}: not a regular expression ({e})") from None


def _vocab_rows(table: list[Module], model: ModelInfo) -> int | None:
    for m in table:
        if m.vocab and m.kind == EMBEDDING:
            info = _find(model, m.weight)
            return info.shape[0] if info is not None and info.shape else None
    return None


def _find(model: ModelInfo, names: tuple[str, ...]) -> TensorInfo | None:
    return next((model.tensors[n] for n in names if n in model.tensors), None)


@dataclass
class _Sorter:
    """mergekit-extract-lora's rules, one module at a time (the order matters: a module whose
    last name part was added to modules_to_save by an earlier one is saved too)."""

    options: ExtractOptions
    ft: ModelInfo
    base: ModelInfo
    embed_lora: bool
    save: list[str] = field(default_factory=list)
    planned: list[ModulePlan] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)  # keys saved for being embeddings
    undecomposable: dict[str, str] = field(default_factory=dict)  # key -> module class

    def __post_init__(self) -> None:
        self.save = list(dict.fromkeys(self.options.modules_to_save))

    def add(self, m: Module) -> None:
        key = m.name.rsplit(".", 1)[-1]
        excluded = any(re.search(p, m.name) for p in self.options.exclude)
        if (m.vocab or m.kind == EMBEDDING) and not self.embed_lora and not excluded:
            self._save_key(key, self.embeddings)
        if m.name in self.save or key in self.save:
            self._plan(m, SAVE)
        elif not excluded and (not self.options.include
                               or any(re.search(p, m.name) for p in self.options.include)):
            if m.kind in ("linear", EMBEDDING):
                self._plan(m, EMBEDDING if m.kind == EMBEDDING else LORA)
            else:
                self.undecomposable.setdefault(key, m.type_name)
                if not self.options.skip_undecomposable:
                    self._save_key(key)
                    self._plan(m, SAVE)

    def _save_key(self, key: str, why: list[str] | None = None) -> None:
        if key not in self.save:
            self.save.append(key)
            if why is not None:
                why.append(key)

    def _plan(self, m: Module, kind: str) -> None:
        weight = _find(self.ft, m.weight)
        if weight is None:
            self.problems.append(f"{self.ft.label} has no tensor {m.weight[0]} (module {m.name}); "
                                 f"leave the module out with -e '{re.escape(m.name)}$'")
            return
        bias = self.ft.tensors.get(m.bias) if m.bias else None
        if kind == SAVE:
            self.planned.append(ModulePlan(m.name, SAVE, weight, bias=bias))
            return
        base = _find(self.base, m.weight)
        if base is None:
            self.problems.append(f"the base {self.base.label} has no tensor {m.weight[0]} (module "
                                 f"{m.name}); leave it out with -e '{re.escape(m.name)}$'")
        elif base.shape != weight.shape:
            self.problems.append(f"{m.weight[0]}: {list(weight.shape)} in {self.ft.label} but "
                                 f"{list(base.shape)} in the base {self.base.label}; a LoRA needs "
                                 "the same shape in both (is this the fine-tune's base model?)")
        else:
            cap = min(self.options.max_rank, *weight.shape)
            self.planned.append(ModulePlan(m.name, kind, weight, base, bias, cap,
                                           _promoted(weight.dtype, base.dtype)))

    def notes(self, vocab: tuple[int | None, int | None]) -> tuple[str, ...]:
        out = []
        if self.options.embed_lora and not self.embed_lora:
            out.append(f"the fine-tune's vocabulary ({vocab[1]} rows) differs from the base's "
                       f"({vocab[0]}): embeddings are saved whole, not as LoRAs (--embed-lora ignored)")
        if self.embeddings:
            out.append(f"{', '.join(self.embeddings)}: embeddings, saved whole (modules_to_save)"
                       + ("" if self.options.embed_lora else "; --embed-lora decomposes them"))
        if self.undecomposable:
            kinds = ", ".join(f"{k} ({t})" for k, t in self.undecomposable.items())
            out.append(f"{kinds}: no LoRA form, " + ("left out (--skip-undecomposable)"
                       if self.options.skip_undecomposable else
                       "saved whole (modules_to_save; --skip-undecomposable leaves them out)"))
        if vocab[0] != vocab[1] and None not in vocab:
            out.append(f"the adapter's embeddings have {vocab[1]} rows: call "
                       f"model.resize_token_embeddings({vocab[1]}) on the base before loading it")
        return tuple(out)


def _promoted(a: str, b: str) -> str:
    import torch

    from mergeflow.dtypes import torch_dtype

    return str(torch.promote_types(torch_dtype(a), torch_dtype(b))).removeprefix("torch.")


def layout(plan: ExtractPlan, ranks: dict[str, int],
           factors: dict[str, tuple[TensorInfo, TensorInfo]] | None = None) -> ExtractPlan:
    """Fix every adapter tensor's name, shape and byte range for these LoRA ranks (a rank of 0:
    the module has no LoRA), in module order: A, B and bias, or a saved module's weight and bias.
    `factors`: A and B already computed (--sv-epsilon), to be copied into place."""
    tensors = []
    for m in plan.modules:
        if m.kind != SAVE and ranks[m.name] > 0:
            r, (rows, cols) = ranks[m.name], m.delta_shape
            a, b = ((".lora_embedding_A", ".lora_embedding_B") if m.kind == EMBEDDING
                    else (".lora_A.weight", ".lora_B.weight"))
            fa, fb = factors[m.name] if factors else (None, None)
            tensors += [AdapterTensor(PREFIX + m.name + a, m.name, "A", m.out_dtype, (r, cols), fa),
                        AdapterTensor(PREFIX + m.name + b, m.name, "B", m.out_dtype, (rows, r), fb)]
        if m.kind == SAVE:
            tensors.append(_copy(PREFIX + m.name + ".weight", m.name, m.weight))
        if m.bias is not None and (m.kind == SAVE or ranks[m.name] > 0):
            # PEFT's own layout for a LoRA with trained biases (bias="lora_only"): the
            # fine-tune's bias replaces the base layer's
            suffix = ".bias" if m.kind == SAVE else ".base_layer.bias"
            tensors.append(_copy(PREFIX + m.name + suffix, m.name, m.bias))
    entries, offset = {}, 0
    for t in tensors:
        n = tensor_nbytes(t.dtype, t.shape)
        entries[t.name] = {"dtype": TORCH_TO_CODE[t.dtype], "shape": list(t.shape),
                           "data_offsets": [offset, offset + n]}
        offset += n
    header = encode_header(entries)
    placed = tuple(dataclasses.replace(t, begin=len(header) + entries[t.name]["data_offsets"][0],
                                       end=len(header) + entries[t.name]["data_offsets"][1])
                   for t in tensors)
    shard = ShardPlan(ADAPTER_FILE, header, len(header) + offset, tuple(t.name for t in tensors))
    return dataclasses.replace(plan, ranks=dict(ranks), tensors=placed, shard=shard)


def _copy(name: str, module: str, source: TensorInfo) -> AdapterTensor:
    from mergeflow.dtypes import CODE_TO_TORCH

    return AdapterTensor(name, module, "copy", CODE_TO_TORCH[source.dtype], source.shape, source)


def adapter_config(plan: ExtractPlan) -> dict:
    """adapter_config.json for the laid-out plan: mergekit's keys, and what PEFT needs beyond
    them to load exactly the file's tensors (a bias mode, the modules it must not target)."""
    ranks = {m: r for m, r in (plan.ranks or {}).items() if r > 0}
    top = max(ranks.values())
    targets = sorted({name.rsplit(".", 1)[-1] for name in ranks})
    # PEFT targets every module whose last name part is a target: name those without a LoRA
    untargeted = [n for n in plan.others + tuple(m for m in plan.ranks or {} if m not in ranks)
                  if n.rsplit(".", 1)[-1] in targets]
    different = {m: r for m, r in ranks.items() if r != top}
    config = {
        "base_model_name_or_path": plan.base.ref.path,
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": top,
        "lora_alpha": top,  # scale alpha / r = 1: the file's B @ A is the delta itself
        "rank_pattern": different,
        "alpha_pattern": different,
        "target_modules": targets,
        "modules_to_save": list(plan.modules_to_save),
        "use_rslora": False,
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    if any(m.bias is not None and ranks.get(m.name) for m in plan.loras):
        config["bias"] = "lora_only"  # the biases are in the file (PEFT's default: "none")
    if plan.base.ref.revision:
        config["revision"] = plan.base.ref.revision
    if untargeted:
        config["exclude_modules"] = sorted(untargeted)
    if plan.tied_saved:  # PEFT keeps the two saved copies one tensor, as in the model
        config["ensure_weight_tying"] = True
    return config


def _with_fingerprint(plan: ExtractPlan) -> ExtractPlan:
    """A hash of everything that decides the adapter's bytes, input file stats included."""
    h = hashlib.sha256()
    h.update(json.dumps([__version__, "extract-lora", dataclasses.asdict(plan.options),
                         [dataclasses.asdict(m) for m in plan.modules]], sort_keys=True,
                        default=str).encode())
    for model in plan.models:
        for f in model.files():
            st = os.stat(f)
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return dataclasses.replace(plan, fingerprint=h.hexdigest()[:32])
