"""Model references as a config writes them: `org/name@revision+adapter@revision`.

The grammar is mergekit's: one optional `+` separates the model from a PEFT LoRA adapter,
and each side takes at most one `@revision` of its own (so in `model+lora@v2` the revision
belongs to the adapter). The long form `{model: {path, revision}, lora: {path, revision}}`
means the same. Nothing here touches the filesystem or the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelRef:
    """A model: a local directory or a Hub id, an optional @revision, an optional +LoRA."""

    path: str
    revision: str | None = None
    lora: str | None = None
    lora_revision: str | None = None

    @classmethod
    def parse(cls, value: Any) -> ModelRef:
        """Read the string or mapping form; ValueError (with the fix) when it is malformed."""
        if isinstance(value, ModelRef):
            return value
        if isinstance(value, dict):
            return _parse_mapping(value)
        if not isinstance(value, str) or not value.strip():
            raise ValueError("a model is a string: a local directory or a Hub id like `org/name`")
        text = value.strip()
        parts = text.split("+")
        if len(parts) > 2:
            raise ValueError(f"model {text!r} has {len(parts) - 1} `+` signs; a model reference is "
                             "`<model>+<lora adapter>` with at most one adapter (mergekit reads it the "
                             "same way); merge the adapters into the model first")
        path, revision = _split_revision(parts[0], text)
        if len(parts) == 1:
            return cls(path, revision)
        lora, lora_revision = _split_revision(parts[1], text)
        return cls(path, revision, lora, lora_revision)

    @property
    def model(self) -> ModelRef:
        """The model without its adapter."""
        return ModelRef(self.path, self.revision)

    def __str__(self) -> str:
        out = self.path + (f"@{self.revision}" if self.revision else "")
        if self.lora:
            out += f"+{self.lora}" + (f"@{self.lora_revision}" if self.lora_revision else "")
        return out


def _split_revision(part: str, whole: str) -> tuple[str, str | None]:
    if part.count("@") > 1:
        raise ValueError(f"model {whole!r} has more than one `@revision` in {part!r}")
    path, _, revision = part.partition("@")
    if not path.strip():
        raise ValueError(f"model {whole!r} has an empty path before `@` or around `+`")
    return path.strip(), revision.strip() or None


def _path_and_revision(value: Any, what: str) -> tuple[str, str | None]:
    if isinstance(value, str):
        return _split_revision(value, value)
    if isinstance(value, dict) and isinstance(value.get("path"), str):
        revision = value.get("revision")
        return value["path"], str(revision) if revision is not None else None
    raise ValueError(f"{what} is a string like `org/name@revision` or a mapping `{{path, revision}}`")


def _parse_mapping(value: dict) -> ModelRef:
    """mergekit's long form: {model: <path or {path, revision}>, lora: <path or {path, revision}>}."""
    inner = value.get("model", value)
    if isinstance(inner, str) and "lora" not in value:
        return ModelRef.parse(inner)  # `{model: a+b}` reads as the string
    path, revision = _path_and_revision(inner, "a model")
    lora = value.get("lora")
    if lora is None:
        return ModelRef(path, revision)
    lora_path, lora_revision = _path_and_revision(lora, "`lora`")
    return ModelRef(path, revision, lora_path, lora_revision)
