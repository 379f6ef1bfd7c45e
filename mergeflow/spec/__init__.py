"""What the user asked for: merge configs (the mergekit YAML format) as frozen models."""

from __future__ import annotations

from mergeflow.spec.config import MergeConfig, ModelRef, load_config, parse_config

__all__ = ["MergeConfig", "ModelRef", "load_config", "parse_config"]
