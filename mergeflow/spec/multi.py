"""Read a multi-stage merge file (mergekit-multi's format, unchanged) into its documents.

The file is a YAML stream of merge configs, each a document with a `name` (mergekit-multi
writes it to `--intermediate-dir/<name>`) except at most one, the unnamed output. A later
document refers to an earlier one's result by that name wherever a model may stand; which
references are names is decided when the stages are planned (plan/multi.py). Each document is
a MergeConfig read by spec/config.py, with its problems located at their line in the whole
file (`file:line:col`), and every problem of every document reported at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from mergeflow.errors import ConfigError
from mergeflow.spec.config import MergeConfig, parse_config

NAME = "name"


@dataclass(frozen=True)
class Document:
    """One merge config of the file: its `name` (None: the unnamed output) and where it starts."""

    name: str | None
    config: MergeConfig  # config.text: the document's own lines (mergekit_config.yml of its stage)
    number: int  # 1-based, counting non-empty documents
    line: int  # 1-based line of its first key

    @property
    def title(self) -> str:
        """How messages name this document."""
        what = f"stage `{self.name}`" if self.name else "the unnamed output"
        return f"{what} (document {self.number}, {self.config.path}:{self.line})"


@dataclass(frozen=True)
class MultiConfig:
    path: str
    text: str
    documents: tuple[Document, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.documents if d.name)

    @property
    def output(self) -> Document:
        """The unnamed document, or else the last one (mergekit-multi writes every named one)."""
        return next((d for d in self.documents if d.name is None), self.documents[-1])

    def document(self, name: str | None) -> Document:
        return next(d for d in self.documents if d.name == name)


def is_multi(path: str | Path) -> bool:
    """Whether the file at `path` is a multi-stage merge: several documents, or one with a `name`."""
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False  # load_config reports it
    return len(docs) > 1 or (len(docs) == 1 and isinstance(docs[0], dict) and NAME in docs[0])


def load_multi(path: str | Path) -> MultiConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), [f"{path}: cannot read the config: {getattr(e, 'strerror', None) or e}"]) from e
    return parse_multi(text, str(path))


def parse_multi(text: str, path: str = "<config>") -> MultiConfig:
    """Every document of `text`, validated; raise ConfigError listing every problem."""
    try:
        nodes = [n for n in yaml.compose_all(text) if not _empty(n)]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise ConfigError(path, [f"{where}: not valid YAML: {getattr(e, 'problem', e)}"]) from e
    if not nodes:
        raise ConfigError(path, [f"{path}:1:1: no merge config: a multi-stage file is YAML documents "
                                 "(separated by `---`), each a merge config with a `name`"])
    problems: list[str] = []
    documents = []
    for number, node in enumerate(nodes, start=1):
        doc_text = _document_text(text, node)
        name, found = _name(node, path, number)
        problems += found
        try:
            config = parse_config(doc_text, path, ignore=(NAME,))
        except ConfigError as e:
            problems += e.problems
            continue
        config = config.model_copy(update={"text": doc_text.lstrip("\n")})  # positions stay the file's
        documents.append(Document(name, config, number, node.start_mark.line + 1))
    problems += _name_problems(nodes, path)
    if problems:
        raise ConfigError(path, sorted(dict.fromkeys(problems), key=_line))
    return MultiConfig(path, text, tuple(documents))


def _line(problem: str) -> tuple[int, int]:
    m = re.match(r"^.*?:(\d+):(\d+): ", problem)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _empty(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")


def _document_text(text: str, node: yaml.Node) -> str:
    """The document's lines (with the comments just above it), after as many empty lines as
    come before them, so positions that spec/config.py finds in it are positions in the file."""
    lines = text.split("\n")
    start, end = node.start_mark.line, node.end_mark.line + (1 if node.end_mark.column else 0)
    while start > 0 and lines[start - 1].lstrip().startswith("#"):
        start -= 1
    return "\n" * start + "\n".join(lines[start:end]) + "\n"


def _name(node: yaml.Node, path: str, number: int) -> tuple[str | None, list[str]]:
    """The document's `name` (None when it has none) and what is wrong with it."""
    if not isinstance(node, yaml.MappingNode):
        return None, []  # parse_config reports it
    for key, value in node.value:
        if key.value != NAME:
            continue
        where = f"{path}:{value.start_mark.line + 1}:{value.start_mark.column + 1}"
        data = yaml.safe_load(yaml.serialize(value))
        if not isinstance(data, str) or not data.strip():
            return None, [f"{where}: `name` of document {number} must be a string (the stage's name, "
                          f"which later documents use as a model), got {data!r}"]
        if data in (".", "..") or any(c in data for c in "/\\\0") or data != data.strip():
            return None, [f"{where}: `name` {data!r} of document {number} must be a plain directory name "
                          "(no `/`, `\\`, surrounding spaces, `.` or `..`): with --intermediate-dir the "
                          "stage is written to a directory of that name"]
        return data, []
    return None, []


def _name_problems(nodes: list[yaml.Node], path: str) -> list[str]:
    """Names used twice, and more than one unnamed document."""
    seen: dict[str, str] = {}
    unnamed: list[str] = []
    problems = []
    for number, node in enumerate(nodes, start=1):
        where = f"{path}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"
        value = next((v for k, v in node.value if k.value == NAME), None) if isinstance(node, yaml.MappingNode) else None
        if value is None:
            unnamed.append(where)
            continue
        name = value.value if isinstance(value, yaml.ScalarNode) else None
        here = f"{path}:{value.start_mark.line + 1}:{value.start_mark.column + 1}"
        if name in seen:
            problems.append(f"{here}: document {number} is named `{name}`, as is the document at {seen[name]}; "
                            "every stage needs its own name")
        elif name is not None:
            seen[name] = here
    if len(unnamed) > 1:
        problems.append(f"{unnamed[1]}: a second document without a `name` (the first is at {unnamed[0]}); "
                        "only the output may be unnamed: name the others")
    return problems
