"""The mergekit-style corpus (configs/corpus/): every config runs (or is refused) as its
`# expect-...` lines say, printing exactly the warnings listed there, each at its line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mergeflow.cli import main

ROOT = Path(__file__).resolve().parents[2]
CORPUS = sorted((ROOT / "configs" / "corpus").glob("*.yml"))


def expectations(text: str) -> tuple[int, list[str], list[str]]:
    exit_code = int((re.findall(r"# expect-exit: (\d+)", text) or ["0"])[0])
    return exit_code, re.findall(r"# expect-warning: (.+)", text), re.findall(r"# expect-error: (.+)", text)


def test_the_corpus_covers_every_method_and_the_cases_of_issue_16():
    from mergeflow.methods import REGISTRY

    texts = "\n".join(p.read_text() for p in CORPUS)
    used = set(re.findall(r"^merge_method: (\w+)", texts, re.M))
    assert used == set(REGISTRY)
    for case in ("modules:", "VLM/", "1e-", "filter:", "[0, 0.3, 0.7, 1]", "expect-exit: 2", "lambda: 3.0"):
        assert case in texts, case


@pytest.mark.parametrize("config", CORPUS, ids=lambda p: p.stem)
def test_corpus_config(config, tmp_path, monkeypatch, capsys, vlm_family):
    monkeypatch.chdir(ROOT)  # the example models are named relative to the repository root
    text = config.read_text()
    path = tmp_path / config.name
    path.write_text(text.replace("VLM/", f"{vlm_family['base'].parent}/"))
    exit_code, warnings, errors = expectations(text)
    out = tmp_path / "out"
    assert main(["run", str(path), str(out), "--scheduler", "sync", "--quiet"]) == exit_code
    err = capsys.readouterr().err
    printed = [line.removeprefix("warning: ") for line in err.splitlines() if line.startswith("warning: ")]
    assert len(printed) == len(warnings), printed
    for expected in warnings:
        assert any(line.startswith(f"{path}:{expected}") for line in printed), (expected, printed)
    for expected in errors:
        assert f"{path}:{expected}" in err, err
    if exit_code == 0:
        assert (out / "config.json").exists()
    else:
        assert not out.exists()
