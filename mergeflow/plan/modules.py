"""Multi-module models (vision-language models): which tensors form which module.

mergekit names the parts of such a model `text_decoder`, `vision_tower` and
`multi_modal_projector`, and a config can merge each with its own `models:` or `slices:`
and parameters (`modules:`). A plain `models:` config merges every module with the same
models, each module's layers counted on their own (a gradient spans each module's layers),
and `slices:` are refused for such models, as mergekit refuses them. A model with one
module (any text model) has the single module `default`.

Modules are found from tensor-name prefixes (the most specific prefix wins; the text decoder
takes the rest), and each module's layout (its layers, the tensors before and after them)
is inferred from its own tensor names, as for a whole text model. The `config.json` section
of a module (`text_config`, `vision_config`) holds its layer count and, for the text
decoder, the vocabulary size; both are updated in the output config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from mergeflow.plan.planner import _Planner, _Slice
from mergeflow.sources import architectures as arch
from mergeflow.sources.models import ModelInfo

TEXT = "text_decoder"
DEFAULT = "default"
# (module, tensor-name prefixes, the config.json section holding its layer count); the text
# decoder is every tensor no prefix claims, counted in `text_config` (or the top level).
RULES: tuple[tuple[str, tuple[str, ...], str | None], ...] = (
    ("multi_modal_projector", ("multi_modal_projector.", "model.multi_modal_projector.", "visual.merger.",
                               "model.visual.merger.", "visual.deepstack_merger_list.",
                               "model.visual.deepstack_merger_list."), None),
    ("vision_tower", ("vision_tower.", "model.vision_tower.", "visual.", "model.visual."), "vision_config"),
)
LAYER_KEYS = ("num_hidden_layers", "depth", "n_layer", "num_layers")


@dataclass(frozen=True)
class ModuleSpec:
    """One module of a model: its tensors, their layout, its embeddings, its config section."""

    name: str
    names: tuple[str, ...]
    layout: arch.Layout
    family: arch.Family
    section: str | None  # config.json key of its sub-config (None: the top level)
    layers_key: str | None  # key of its layer count inside that section (None: it has no layers)


@dataclass
class Unit:
    """One module as merged: its slices (sources in config order) and its layout."""

    spec: ModuleSpec
    slices: list[_Slice]
    layer_map: list[tuple[int, int]] | None = None  # filled by the planner


def module_specs(model: ModelInfo) -> dict[str, ModuleSpec]:
    """The model's modules by name; one `default` module for a text model."""
    owner: dict[str, str] = {}
    for name in model.tensors:
        best = max(((len(pre), module) for module, prefixes, _ in RULES for pre in prefixes
                    if name.startswith(pre)), default=(0, TEXT))
        owner[name] = best[1]
    found = set(owner.values())
    if found == {TEXT} or "vision_config" not in model.config:
        return {DEFAULT: _spec(DEFAULT, list(model.tensors), model.config, None)}
    sections = {module: section for module, _, section in RULES}
    sections[TEXT] = "text_config" if isinstance(model.config.get("text_config"), dict) else None
    return {m: _spec(m, [n for n in model.tensors if owner[n] == m], model.config, sections[m])
            for m in (TEXT, *[r[0] for r in RULES]) if m in found}


def _spec(module: str, names: list[str], config: dict, section: str | None) -> ModuleSpec:
    sub = config.get(section) if section else config
    sub = sub if isinstance(sub, dict) else {}
    fam = arch.family(sub if module in (TEXT, DEFAULT) else {"model_type": "none"})
    if module not in (TEXT, DEFAULT):  # vision and projector tensors are never vocabulary rows
        fam = arch.Family(embed=(), lm_head=None)
    elif module == TEXT:
        fam = _prefixed(fam, names)
    key = next((k for k in LAYER_KEYS if isinstance(sub.get(k), int)), None) if module != DEFAULT else fam.layer_key
    if module == "multi_modal_projector" or (module != DEFAULT and key is None):
        layout = arch.Layout("", 0, (), tuple(names), ())  # loose tensors only
    else:
        layout = arch.infer_layout(names, fam)
    return ModuleSpec(module, tuple(names), layout, fam, section, key)


def _prefixed(fam: arch.Family, names: list[str]) -> arch.Family:
    """The text family with its embedding and head names as this model stores them
    (`language_model.model.embed_tokens.weight`, `model.language_model.embed_tokens.weight`)."""
    def stored(short: str) -> str:
        tail = short.removeprefix("model.")
        return next((n for n in names if n == short or n.endswith("." + short) or n.endswith("." + tail)), short)

    head = fam.lm_head and stored(fam.lm_head)
    if head == fam.lm_head and any(n.startswith("language_model.") for n in names):
        head = "language_model." + fam.lm_head  # a tied head, absent: where it would be
    return replace(fam, embed=tuple(stored(e) for e in fam.embed), lm_head=head)


def plan_units(p: _Planner, slices: list[_Slice], allow_download: bool) -> list[Unit]:
    """The merge as modules. `slices` are the planner's for a `models:` or `slices:` config
    (empty for `modules:`, whose models are read here). Problems go to `p.problems`."""
    cfg = p.config
    if cfg.modules:  # `modules: {}` is no modules (mergekit reads it so)
        return _configured_units(p, allow_download)
    if not slices:
        return []
    first = slices[0]
    reference = first.base if first.base is not None else first.sources[0][0]
    specs = module_specs(p.models[reference])
    if len(specs) == 1:
        return [Unit(next(iter(specs.values())), slices)]
    if cfg.slices:
        p.problems.append(f"{cfg.where(('slices',))}: {p.models[reference].label} has several modules "
                          f"({', '.join(specs)}); `slices:` would stack only some of its layers. Use "
                          "`modules:` with slices per module (mergekit refuses `slices:` here too)")
        return []
    return [Unit(spec, [_module_slice(p, first, spec)]) for spec in specs.values()]


def _module_slice(p: _Planner, whole: _Slice, spec: ModuleSpec) -> _Slice:
    counts = {_module_layers(p.models[m], spec.name) for m, _, _, _ in whole.sources}
    if len(counts) > 1:
        p.problems.append(f"{p.config.where(whole.loc)}: the models' {spec.name} modules have different layer "
                          f"counts {sorted(counts)}; use `modules:` with slices to choose the layers")
    return _Slice(whole.sources, max(counts), whole.base, whole.params, whole.loc)


def _module_layers(model: ModelInfo, module: str) -> int:
    spec = module_specs(model).get(module)
    return spec.layout.layers if spec else 0


def _configured_units(p: _Planner, allow_download: bool) -> list[Unit]:
    cfg = p.config
    top_base = p.model(cfg.base_model, ("base_model",), allow_download) if cfg.base_model else None
    read: list[tuple[str, list[_Slice]]] = []
    for name, module in cfg.modules.items():
        loc = ("modules", name)
        if module.models:
            sources = [(p.model(m.model, loc + ("models", i, "model"), allow_download), 0, m.parameters,
                        loc + ("models", i)) for i, m in enumerate(module.models)]
            if top_base is not None and top_base not in [s[0] for s in sources]:
                sources.append((top_base, 0, None, ("base_model",)))
            read.append((name, [_Slice(sources, 0, top_base, None, loc + ("models",), module.parameters)]))
        else:
            read.append((name, [_module_out_slice(p, name, i, sl, top_base, module.parameters, allow_download)
                                for i, sl in enumerate(module.slices or [])]))
    if any(s[0] is None for _, slices in read for sl in slices for s in sl.sources) or not read:
        return []
    first = read[0][1][0]
    reference = top_base if top_base is not None else first.sources[0][0]
    specs = module_specs(p.models[reference])
    units = []
    for name, slices in read:
        spec = specs.get(name)
        if spec is None:
            from mergeflow.spec.config import suggest

            p.problems.append(f"{cfg.where(('modules', name))}: {p.models[reference].label} has no module "
                              f"`{name}`{suggest(name, list(specs))}; its modules are {', '.join(specs)}")
            continue
        for sl in slices:
            if cfg.modules[name].models:
                sl.layers = _check_counts(p, sl, spec)
            else:
                _check_ranges(p, sl, spec)
        units.append(Unit(spec, slices))
    left_out = [m for m in specs if m not in cfg.modules]
    if left_out and units:
        p.warnings.append(f"{cfg.where(('modules',))}: the output has only the modules listed under `modules:`; "
                          f"{', '.join(left_out)} of {p.models[reference].label} is left out (as in mergekit), "
                          "so transformers will initialise it randomly; list it to keep it")
    return units


def _module_out_slice(p: _Planner, module: str, i: int, sl, top_base: int | None, module_params: dict | None,
                      allow_download: bool) -> _Slice:
    loc = ("modules", module, "slices", i)
    base = top_base
    if sl.base_model is not None:
        base = p.model(sl.base_model, loc + ("base_model",), allow_download)
    sources = [(p.model(s.model, loc + ("sources", j, "model"), allow_download), s.layer_range[0], s.parameters,
                loc + ("sources", j)) for j, s in enumerate(sl.sources)]
    n = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
    return _Slice(sources, n, base, sl.parameters, loc, module_params)


def _check_counts(p: _Planner, sl: _Slice, spec: ModuleSpec) -> int:
    counts = {}
    for m, _, _, _ in sl.sources:
        counts[p.models[m].label] = _module_layers(p.models[m], spec.name)
    if len(set(counts.values())) > 1:
        p.problems.append(f"{p.config.where(sl.loc)}: the models' {spec.name} modules have different layer "
                          f"counts {counts}; use `slices:` in this module to choose the layers")
    return max(counts.values(), default=0)


def _check_ranges(p: _Planner, sl: _Slice, spec: ModuleSpec) -> None:
    for m, first, _, loc in sl.sources:
        have = _module_layers(p.models[m], spec.name)
        if first + sl.layers > have:
            p.problems.append(f"{p.config.where(loc + ('layer_range',))}: layer_range [{first}, {first + sl.layers}] "
                              f"goes beyond the {spec.name} of {p.models[m].label}, which has {have} layers")


def is_plain(units: list[Unit]) -> bool:
    """One `default` module: the whole model, planned as before modules existed."""
    return len(units) == 1 and units[0].spec.name == DEFAULT


def text_unit(units: list[Unit]) -> Unit:
    return next((u for u in units if u.spec.name in (TEXT, DEFAULT)), units[0])


def update_config(cfg: dict, units: list[Unit], models: list[ModelInfo], vocab_rows: int | None) -> None:
    """Each module's layer count (and per-layer lists) in its config section; the text
    decoder's vocab_size. The top level is the planner's (_output_config)."""
    for unit in units:
        spec = unit.spec
        section = cfg.get(spec.section) if spec.section else None
        if not isinstance(section, dict) or spec.layers_key is None or unit.layer_map is None:
            continue
        old = section.get(spec.layers_key)
        section[spec.layers_key] = len(unit.layer_map)
        if isinstance(old, int) and old != len(unit.layer_map):
            for key, value in list(section.items()):
                if isinstance(value, list) and len(value) == old:
                    section[key] = [_at(_source_list(models[m], spec.section, key, value), i) for m, i in unit.layer_map]
    text = cfg.get("text_config")
    if vocab_rows is not None and isinstance(text, dict) and "vocab_size" in text:
        text["vocab_size"] = vocab_rows


def _at(values: list, i: int):
    return values[min(i, len(values) - 1)]


def _source_list(model: ModelInfo, section: str, key: str, fallback: list) -> list:
    value = (model.config.get(section) or {}).get(key)
    return value if isinstance(value, list) else json.loads(json.dumps(fallback))
