"""An earlier stage's output as a later stage's planner sees it: a model that exists only
as a plan (multi-stage merges, plan/multi.py).

Its tensors are the stage's planned output tensors (names after layer renumbering, shapes,
output dtypes, the byte ranges they get in the stage's shards); its config.json is the
stage's out_config; its directory holds the small files the stage would write (config.json,
tokenizer files, generation_config.json) but no weights, so the tokenizer and chat-template
code reads it as any model directory. Nothing of it is a tensor on disk until a run writes
it (with --intermediate-dir), so it has no files to fingerprint: its stage's fingerprint
stands for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergeflow.sources.models import ModelInfo


@dataclass(frozen=True)
class StageModel(ModelInfo):
    stage: str = ""  # the stage's name, as the config refers to it

    @property
    def label(self) -> str:
        return self.stage

    def files(self) -> list[str]:
        return []
