"""The output directory: an OUT that is an input under another path is refused, links
inside OUT are replaced and never written through, and nothing outside OUT changes.

A table of cases (CASES), each building its inputs and OUT under tmp_path and running the
CLI in-process (sync scheduler). A refused case asserts exit 2, one `error:` paragraph with
its key words, and that every file outside OUT and OUT's old contents are unchanged. A case
that merges asserts exit 0, the same bytes as a merge into an empty directory, regular
files in OUT, and every file outside OUT unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergeflow.cli import main

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def tree(root: Path) -> dict[str, str]:
    """Every file under `root` (links as links) and a digest of its bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@dataclass
class Env:
    family: dict[str, Path]
    tmp: Path

    def __post_init__(self) -> None:
        self.models = self.tmp / "models"
        for name in ("base", "a", "b"):
            shutil.copytree(self.family[name], self.models / name)
        self.out = self.tmp / "out"
        self.outside = self.tmp / "outside"  # files OUT's links point to
        self.outside.mkdir()

    def config(self, a: str | Path = "", b: str | Path = "", extra: str = "") -> str:
        a, b = a or self.models / "a", b or self.models / "b"
        path = self.tmp / "merge.yml"
        path.write_text(f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
                        f"  - model: {b}\n    parameters: {{weight: 0.5}}\ndtype: bfloat16\n{extra}")
        return str(path)

    def adapter(self) -> Path:
        """A PEFT LoRA adapter (rank 2) for a's q_proj, whose delta is zero."""
        adapter = self.models / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
        prefix = "base_model.model." + Q_PROJ.removesuffix(".weight")
        save_file({f"{prefix}.lora_A.weight": torch.zeros(2, 64), f"{prefix}.lora_B.weight": torch.zeros(64, 2)},
                  adapter / "adapter_model.safetensors")
        return adapter


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[Env], tuple]  # (config, *extra args); may move env.out
    expect: tuple[str, ...]  # key words of the error; () for a case that merges


CASES: list[Case] = []


def case(id: str, *expect: str):
    def register(setup):
        CASES.append(Case(id, setup, expect))
        return setup
    return register


@case("out-is-the-lora-adapter", "overlaps the LoRA adapter", "adapter", "it is that directory",
      "outside every input")
def _(e: Env):
    adapter = e.adapter()
    e.out = adapter
    return e.config(f"{e.models / 'a'}+{adapter}"), "--force"


@case("out-is-the-tokenizer-source", "overlaps the tokenizer source", "it is that directory")
def _(e: Env):
    e.out = e.models / "base"  # not merged: only its tokenizer is read
    return e.config(extra=f"tokenizer_source: {e.models / 'base'}\n"), "--force"


@case("out-is-a-tokens-source-under-a-link", "overlaps the input model", "it is that directory")
def _(e: Env):
    e.out = e.tmp / "alias"
    e.out.symlink_to(e.models / "b", target_is_directory=True)
    tokens = (f"tokenizer:\n  source: union\n  tokens:\n    <|new|>:\n      source: {{kind: model_token, "
              f"model: {e.models / 'b'}, token_id: 0}}\n")
    return e.config(extra=tokens), "--force"


@case("out-is-a-link-to-the-adapter", "overlaps the LoRA adapter", "it is that directory")
def _(e: Env):
    adapter = e.adapter()
    e.out = e.tmp / "alias"
    e.out.symlink_to(adapter, target_is_directory=True)
    return e.config(f"{e.models / 'a'}+{adapter}"), "--resume", "--force"


@case("out-inside-the-tokenizer-source", "overlaps the tokenizer source", "it lies inside it")
def _(e: Env):
    e.out = e.models / "base" / "merged"
    return (e.config(extra=f"tokenizer_source: {e.models / 'base'}\n"),)


@case("out-holds-the-inputs", "overlaps the input model", "it holds it")
def _(e: Env):
    e.out = e.models
    return e.config(f"{e.models / 'a'}+{e.adapter()}"), "--force"


def _link_into_out(e: Env, name: str, content: bytes = b"precious") -> None:
    e.out.mkdir(exist_ok=True)
    target = e.outside / name
    target.write_bytes(content)
    (e.out / name).symlink_to(target)


@case("links-in-out-are-replaced")
def _(e: Env):
    for name in ("model.safetensors", "tokenizer.json", "config.json", "README.md", "mergekit_config.yml",
                 "generation_config.json", "model.safetensors.index.json"):
        _link_into_out(e, name)
    return e.config(), "--force"


@case("a-link-as-the-state-directory-is-replaced")
def _(e: Env):
    e.out.mkdir()
    (e.out / ".mergeflow").symlink_to(e.outside, target_is_directory=True)
    (e.outside / "journal").write_text("plan elsewhere\n")
    return e.config(), "--force"


@case("a-shard-hard-linked-to-an-input-is-replaced")
def _(e: Env):
    e.out.mkdir()
    os.link(e.models / "a" / "model.safetensors", e.out / "model.safetensors")
    return e.config(), "--force"


@case("resume-keeps-no-linked-shard")
def _(e: Env):
    """A journal saying every tensor is done and a shard that is a link to a copy of a
    finished one elsewhere: the linked shard does not count, it is replaced and merged."""
    assert main(["run", e.config(), str(e.tmp / "done"), "--scheduler", "sync", "--quiet"]) == 0
    (e.tmp / "done" / "model.safetensors").rename(e.outside / "model.safetensors")
    e.out.mkdir()
    (e.out / "model.safetensors").symlink_to(e.outside / "model.safetensors")
    return e.config(), "--resume", "--force"


def _run(args: tuple, out: Path, capsys) -> tuple[int, str]:
    config, *extra = args
    rc = main(["run", config, str(out), "--scheduler", "sync", "--quiet", *extra])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_output_directory_cases(bad: Case, family, tmp_path, capsys):
    env = Env(family, tmp_path)
    args = bad.setup(env)
    if not bad.expect:  # what the same config gives in an empty directory
        assert main(["run", args[0], str(tmp_path / "clean"), "--scheduler", "sync", "--quiet"]) == 0
        merged = tree(tmp_path / "clean")
    outside_out = {p: tree(p) for p in (env.models, env.outside)}
    before = tree(env.out) if env.out.exists() else None
    rc, err = _run(args, env.out, capsys)
    after_outside = {p: tree(p) for p in (env.models, env.outside)}
    if bad.expect:
        assert rc == 2, err
        assert err.startswith("error: ") and ("\n" + err).count("\nerror: ") == 1 and "Traceback" not in err
        for words in bad.expect:
            assert words in err, f"{words!r} not in:\n{err}"
        assert after_outside == outside_out
        assert (tree(env.out) if env.out.exists() else None) == before
        return
    assert rc == 0, err
    assert after_outside == outside_out  # no link was written through
    assert tree(env.out) == merged  # the merged files, each a regular file of OUT's own
    assert all(not p.is_symlink() and p.stat().st_nlink == 1 for p in env.out.iterdir())


def test_out_that_is_a_bind_mount_of_an_input_is_refused(family, tmp_path):
    """OUT is an input model mounted at another path (a bind mount: another path, the same
    device and inode). Run in a user and mount namespace of its own, so no mount outlives
    the test and no root is needed."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("cannot make a mount namespace here (unshare -rm)")
    env = Env(family, tmp_path)
    config = env.config()
    mount = tmp_path / "mounted"
    mount.mkdir()
    before = tree(env.models)
    script = (f"mount --bind {env.models / 'b'} {mount} && exec {sys.executable} -m mergeflow.cli run "
              f"{config} {mount} --force --scheduler sync --quiet")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: output directory {mount} overlaps the input model "
                                  f"{env.models / 'b'} ({env.models / 'b'}): it is that directory under "
                                  "another path (a link or a bind mount)"), done.stderr
    assert tree(env.models) == before and list(mount.iterdir()) == []
