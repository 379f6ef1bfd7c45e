"""The one exception type for user errors (bad config, bad inputs, bad output directory).

The CLI turns a MergeflowError into exit code 2 and its message, without a traceback.
"""

from __future__ import annotations


class MergeflowError(Exception):
    """A problem the user can fix; the message says what, where and how."""


class ConfigError(MergeflowError):
    """The merge config is invalid; `problems` lists every problem found, each located."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        head = f"{path}: {len(problems)} problem{'s' if len(problems) != 1 else ''} in the merge config"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in problems))
