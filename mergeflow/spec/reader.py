"""Read config text into plain data and the position of every node, refusing hostile input.

A config is bounded before anything else runs: at most MAX_BYTES of UTF-8, nested at most
MAX_DEPTH deep, and at most MAX_NODES nodes once YAML aliases are expanded (a "billion
laughs" document is a few hundred bytes that expand to billions of nodes). A duplicate
mapping key is an error naming both lines: YAML would silently keep only the last one.
Positions map each node's path (keys and list indices) to its 1-based (line, column).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from mergeflow.errors import ConfigError

MAX_BYTES = 2_000_000
MAX_DEPTH = 64
MAX_NODES = 200_000

Positions = dict[tuple, tuple[int, int]]


def read_text(path: Path) -> str:
    """The config file's text: a regular file of at most MAX_BYTES of UTF-8."""
    where = str(path)
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise _one(where, f"{where}: is a directory; give the path of the YAML config file")
        if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block or never end
            raise _one(where, f"{where}: not a regular file; give the path of the YAML config file")
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise _one(where, f"{where}: cannot read the config: {e.strerror}") from e
    if len(raw) > MAX_BYTES:
        raise _one(where, f"{where}: the config is larger than {MAX_BYTES:,} bytes; a merge config is "
                   "a few kilobytes of YAML (is this the right file?)")
    return decode(raw, where)


def decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise _one(where, f"{where}:{line}:{col}: the config is not UTF-8 text (byte 0x{raw[e.start]:02x}); "
                   "save it as UTF-8") from None


def parse_yaml(text: str, where: str) -> tuple[Any, Positions, list[str]]:
    """YAML text -> (data, positions, duplicate-key problems); ConfigError for bad syntax,
    size or depth. Duplicates are returned, not raised, so they are reported with the rest."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise _one(where, f"{where}: the config is larger than {MAX_BYTES:,} bytes; a merge config is "
                   "a few kilobytes of YAML")
    try:
        _check_depth(text, where)
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None, {}, []
            _check_size(node, where)
            problems = _duplicate_keys(node, where)
            data = loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark else where
        several = "expected a single document" in str(getattr(e, "context", ""))
        hint = ("; a file of several merge documents is a multi-stage merge: run it with `mergeflow multi`"
                if several else "")
        raise _one(where, f"{at}: not valid YAML: {getattr(e, 'problem', None) or e}{hint}") from None
    except RecursionError:  # the depth check bounds this; kept as a last guard
        raise _one(where, f"{where}: the config is nested too deeply (more than {MAX_DEPTH} levels)") from None
    return data, positions(node), problems


def _check_depth(text: str, where: str) -> None:
    """Refuse deep nesting from the event stream, before the (recursive) composer sees it."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                m = event.start_mark
                raise _one(where, f"{where}:{m.line + 1}:{m.column + 1}: the config is nested more than "
                           f"{MAX_DEPTH} levels deep; a merge config needs fewer than ten")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _check_size(root: yaml.Node, where: str) -> None:
    """Count nodes as if every alias were copied out (memoised per node: linear time)."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = 1  # a recursive alias counts once (and is refused by the schema)
        n = 1
        if isinstance(node, yaml.MappingNode):
            n += sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            n += sum(size(v) for v in node.value)
        sizes[id(node)] = n
        return n

    if size(root) > MAX_NODES:
        raise _one(where, f"{where}: the config expands to more than {MAX_NODES:,} YAML nodes (through "
                   "`&anchor` / `*alias` references); refusing it. Write the values out or use fewer aliases")


def _duplicate_keys(root: yaml.Node, where: str) -> list[str]:
    problems: list[str] = []
    seen_nodes: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Node] = {}
            for key, value in node.value:
                stack.append(value)
                if not isinstance(key, yaml.ScalarNode) or key.value == "<<":
                    continue  # merge keys (`<<: *base`) are meant to be overridden
                if key.value in first:
                    line0 = first[key.value].start_mark.line + 1
                    m = key.start_mark
                    problems.append(f"{where}:{m.line + 1}:{m.column + 1}: duplicate key `{key.value}` "
                                    f"(first at line {line0}); YAML would silently keep only this one; "
                                    "remove one of them")
                else:
                    first[key.value] = key
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return sorted(problems, key=line_key)


def line_key(problem: str) -> tuple[int, int]:
    """Sort key of a located message: its (line, column), (0, 0) when it has none."""
    m = re.match(r"^.*?:(\d+):(\d+): ", problem)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def positions(node: yaml.Node, loc: tuple = (), out: Positions | None = None) -> Positions:
    """Map every node's path (keys and list indices) to its 1-based (line, col); a mapping
    entry's path points at its key."""
    out = {} if out is None else out
    out.setdefault(loc, (node.start_mark.line + 1, node.start_mark.column + 1))
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = loc + (key.value if isinstance(key, yaml.ScalarNode) else repr(key.value),)
            positions(value, path, out)
            out[path] = (key.start_mark.line + 1, key.start_mark.column + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            positions(item, loc + (i,), out)
    return out


def locate(path: str, positions: Positions, loc: tuple) -> str:
    """`file:line:col` of the node at `loc` (or of its nearest located parent). Without
    positions (a config given as a dict) the node's key path: `<dict>: models[1].parameters`."""
    loc = tuple(loc)
    if not positions:
        dotted = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        return f"{path}: {dotted or 'config'}"
    while loc and loc not in positions:
        loc = loc[:-1]
    line, col = positions.get(loc, (1, 1))
    return f"{path}:{line}:{col}"


def _one(where: str, problem: str) -> ConfigError:
    return ConfigError(where, [problem])
