"""Multi-stage files (mergekit-multi's format): documents, names, the output, problems
located at their line in the whole file."""

from __future__ import annotations

import pytest

from mergeflow.errors import ConfigError
from mergeflow.spec.multi import is_multi, load_multi, parse_multi

CHAIN = """# a chain of two stages
name: first
merge_method: karcher
models:
  - model: org/a
  - model: org/b
---
# the output (unnamed)
merge_method: slerp
base_model: first
models:
  - model: first
  - model: org/c
parameters: {t: 0.5}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_multi(text, "m.yml")
    return err.value.problems


def test_documents_names_and_the_output():
    multi = parse_multi(CHAIN, "m.yml")
    first, out = multi.documents
    assert (first.name, first.number, first.line) == ("first", 1, 2)
    assert (out.name, out.number, out.line) == (None, 2, 9)
    assert multi.names == ("first",) and multi.output is out
    assert out.config.merge_method == "slerp" and str(out.config.base_model) == "first"
    # positions are lines of the whole file; the config's text is its own document (and the
    # comments just above it)
    assert out.config.where(("models", 1, "model")) == "m.yml:13:5"
    assert out.config.text == "# the output (unnamed)\n" + CHAIN.split("# the output (unnamed)\n")[1]
    assert first.title == "stage `first` (document 1, m.yml:2)"
    assert out.title == "the unnamed output (document 2, m.yml:9)"


def test_without_an_unnamed_document_the_last_is_the_output():
    multi = parse_multi(CHAIN.replace("# the output (unnamed)\n", "name: second\n"), "m.yml")
    assert multi.output.name == "second" and multi.names == ("first", "second")


def test_empty_documents_are_skipped():
    multi = parse_multi("---\n" + CHAIN + "---\n...\n", "m.yml")
    assert [d.number for d in multi.documents] == [1, 2]


def test_every_problem_of_every_document_at_its_line():
    text = CHAIN.replace("merge_method: slerp", "merge_method: slrep").replace("  - model: org/b\n",
                                                                              "  - model: org/b\ndtype: float33\n")
    assert problems(text) == [
        "m.yml:7:1: unknown dtype `float33` (did you mean `float32`?)",
        "m.yml:10:1: unknown merge_method `slrep` (did you mean `slerp`?); `mergeflow methods` lists them",
    ]


@pytest.mark.parametrize("name, message", [
    ("../up", "`name` '../up' of document 1 must be a plain directory name (no `/`, `\\`, surrounding "
              "spaces, `.` or `..`): with --intermediate-dir the stage is written to a directory of that name"),
    ("a/b", "`name` 'a/b' of document 1 must be a plain directory name (no `/`, `\\`, surrounding "
            "spaces, `.` or `..`): with --intermediate-dir the stage is written to a directory of that name"),
    ("3", "`name` of document 1 must be a string (the stage's name, which later documents use as a "
          "model), got 3"),
])
def test_names_must_be_plain_directory_names(name, message):
    assert problems(CHAIN.replace("name: first", f"name: {name}")) == [f"m.yml:2:7: {message}"]


def test_a_name_used_twice_and_two_unnamed_documents():
    text = CHAIN + "---\nname: first\nmerge_method: karcher\nmodels: [{model: org/d}]\n"
    assert problems(text) == ["m.yml:16:7: document 3 is named `first`, as is the document at m.yml:2:7; "
                              "every stage needs its own name"]
    text = CHAIN + "---\nmerge_method: karcher\nmodels: [{model: org/d}]\n"
    assert problems(text) == ["m.yml:16:1: a second document without a `name` (the first is at m.yml:9:1); "
                              "only the output may be unnamed: name the others"]


def test_yaml_errors_and_empty_files():
    assert problems(CHAIN + "---\nname: [unclosed\n") == [
        "m.yml:17:1: not valid YAML: expected ',' or ']', but got '<stream end>'"]
    assert problems("---\n...\n") == ["m.yml:1:1: no merge config: a multi-stage file is YAML documents "
                                      "(separated by `---`), each a merge config with a `name`"]


def test_is_multi_and_the_hint_of_mergeflow_run(tmp_path):
    from mergeflow.spec.config import load_config

    (tmp_path / "m.yml").write_text(CHAIN)
    (tmp_path / "one.yml").write_text(CHAIN.split("---\n")[0])
    (tmp_path / "plain.yml").write_text("merge_method: karcher\nmodels: [{model: org/a}]\n")
    assert is_multi(tmp_path / "m.yml") and is_multi(tmp_path / "one.yml")
    assert not is_multi(tmp_path / "plain.yml") and not is_multi(tmp_path / "missing.yml")
    assert len(load_multi(tmp_path / "one.yml").documents) == 1
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "m.yml")
    assert err.value.problems == [f"{tmp_path / 'm.yml'}:7:1: not valid YAML: but found another document; a file "
                                  "of several merge documents is a multi-stage merge: run it with "
                                  "`mergeflow multi`"]
