"""`mergeflow methods`: every merge method with its parameters, defaults and base rule."""

from __future__ import annotations


def cmd_methods(args) -> int:
    from mergeflow.methods import REGISTRY

    for name, m in REGISTRY.items():
        base = {"required": "base required", "optional": "base optional", "input": "no base"}[m.base]
        print(f"{name}: {m.doc} ({base})")
        for p in m.params:
            scope = "per model" if p.per_model else "method-wide"
            default = "required" if p.required else f"default {p.default}"
            print(f"    {p.name} ({p.type.__name__}, {scope}, {default}) {p.doc}")
    return 0
