"""Bad inputs and failures: exit code 2, a clear message, and no output that looks complete.

A table of cases (CASES), each a bad config, a damaged or incompatible model, or a bad output
directory, run through the CLI in-process (`mergeflow.cli.main`, sync scheduler). Each case
asserts exit code 2, the key words of its message, no traceback, and that the output
directory holds neither config.json nor an index. A few run as a real subprocess to prove
that nothing but the message reaches the terminal.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from badinputs import (
    LAYER1_UP,
    Custom,
    RunsCode,
    change_tensors,
    copy_model,
    edit_header,
    replace_with_bin,
    set_header_length,
    split_header,
    truncate,
    weights,
    write_header,
)

from mergeflow.cli import main
from mergeflow.testing import make_model


@pytest.fixture(scope="module")
def zoo(family, tmp_path_factory) -> dict[str, Path]:
    """The family plus models that do not fit it: more layers, another architecture, sharded."""
    root = tmp_path_factory.mktemp("zoo")
    return {**family,
            "deep": make_model(root / "deep", seed=5, layers=6),
            "mistral": make_model(root / "mistral", seed=6, family="mistral"),
            "sharded": make_model(root / "sharded", seed=7, base=family["base"], shards=2)}


@dataclass
class Env:
    """What a case's setup gets: the models, a scratch directory, the output path."""

    zoo: dict[str, Path]
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    out: Path = field(init=False)
    after_plan: list[Callable[[], None]] = field(default_factory=list)
    out_is_model: bool = False  # the output path is an input model: it must stay as it was

    def __post_init__(self):
        self.out = self.tmp / "out"

    def copy(self, name: str, as_name: str | None = None) -> Path:
        return copy_model(self.zoo[name], self.tmp / "models" / (as_name or name))

    def config(self, text: str) -> str:
        path = self.tmp / "merge.yml"
        path.write_text(text.format(**{k: str(v) for k, v in self.zoo.items()}))
        return str(path)

    def linear(self, a: Path | str, b: Path | str, extra: str = "") -> str:
        return self.config(f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: "
                           f"{{{{weight: 0.5}}}}\n  - model: {b}\n    parameters: {{{{weight: 0.5}}}}\n"
                           + extra)


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[Env], str | tuple]  # returns the config path, or (config, *extra args)
    expect: tuple[str, ...]  # key words of the message, in any order


CASES: list[Case] = []


def case(id: str, *expect: str):
    def register(setup):
        CASES.append(Case(id, setup, expect))
        return setup
    return register


LINEAR_AB = ("merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
             "  - model: {b}\n    parameters: {{weight: 0.5}}\n")

# ---- configs ---------------------------------------------------------------------------

case("config-file-missing", "cannot read the config", "nope.yml")(
    lambda e: str(e.tmp / "nope.yml"))
case("yaml-syntax", "not valid YAML", "merge.yml:")(
    lambda e: e.config("merge_method: linear\nmodels: [{{model: {a}\n"))
case("yaml-not-a-mapping", "a merge config is a YAML mapping")(
    lambda e: e.config("- linear\n- {a}\n"))
case("unknown-key", "unknown key `modles`", "did you mean `models`")(
    lambda e: e.config(LINEAR_AB.replace("models:", "modles:")))
case("unknown-method", "unknown merge_method `lineer`", "did you mean `linear`")(
    lambda e: e.config(LINEAR_AB.replace("linear", "lineer")))
case("unknown-parameter", "`densty` is not a parameter of linear")(
    lambda e: e.config(LINEAR_AB.replace("weight: 0.5}", "weight: 0.5, densty: 0.5}", 1)))
case("parameter-wrong-type", "models.0.parameters.weight", "a parameter value is a number")(
    lambda e: e.config(LINEAR_AB.replace("weight: 0.5}", "weight: heavy}", 1)))
case("parameter-bool-wrong", "normalize must be true or false")(
    lambda e: e.config(LINEAR_AB + "parameters: {{normalize: 3}}\n"))
case("parameter-out-of-range", "t must be <= 1", "got 1.5")(
    lambda e: e.config("merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n"
                       "  - model: {a}\nparameters: {{t: 1.5}}\n"))
case("parameter-required-missing", "1 problem(s)", "linear needs `weight`", "for model")(
    lambda e: e.config(LINEAR_AB.replace("    parameters: {{weight: 0.5}}\n", "", 1)))
case("parameter-wrong-scope", "`normalize` applies to the whole linear merge")(
    lambda e: e.config(LINEAR_AB.replace("weight: 0.5}", "weight: 0.5, normalize: false}", 1)))
case("models-and-slices", "either `models` or `slices`")(
    lambda e: e.config(LINEAR_AB + "slices:\n  - sources: [{{model: {a}, layer_range: [0, 4]}}]\n"))
case("nothing-to-merge", "nothing to merge")(
    lambda e: e.config("merge_method: linear\ndtype: bfloat16\n"))
case("unknown-dtype", "unknown dtype `bfloat`", "did you mean `bfloat16`")(
    lambda e: e.config(LINEAR_AB + "dtype: bfloat\n"))
case("uneven-slices", "uneven layer counts [2, 3]")(
    lambda e: e.config("merge_method: linear\nslices:\n  - sources:\n"
                       "      - {{model: {a}, layer_range: [0, 2], parameters: {{weight: 1}}}}\n"
                       "      - {{model: {b}, layer_range: [0, 3], parameters: {{weight: 1}}}}\n"))
case("empty-layer-range", "layer_range [2, 2] is empty")(
    lambda e: e.config("merge_method: passthrough\nslices:\n"
                       "  - sources: [{{model: {a}, layer_range: [2, 2]}}]\n"))
case("base-model-absent", "ties needs a `base_model`")(
    lambda e: e.config(LINEAR_AB.replace("linear", "ties")))
case("too-many-inputs", "slerp takes at most 1 model(s) besides the base, got 2")(
    lambda e: e.config("merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n"
                       "  - model: {a}\n  - model: {b}\nparameters: {{t: 0.5}}\n"))
case("model-not-a-string", "a model is a string")(
    lambda e: e.config(LINEAR_AB.replace("model: {a}", "model: 5")))

# ---- models that cannot be found or read -------------------------------------------------


@case("model-path-missing", "no such directory", "merge.yml:3:")
def _(e):
    return e.linear(e.tmp / "nowhere" / "model", "{a}")


@case("model-path-is-a-file", "is a file", "a model is a directory")
def _(e):
    (e.tmp / "file").write_text("x")
    return e.linear("{a}", e.tmp / "file")


@case("directory-not-a-model", "has no config.json", "not a Hugging Face model directory")
def _(e):
    (e.tmp / "empty").mkdir()
    return e.linear("{a}", e.tmp / "empty")


@case("config-json-broken", "cannot read", "config.json")
def _(e):
    model = e.copy("b")
    (model / "config.json").write_text("{not json")
    return e.linear("{a}", model)


@case("no-weight-files", "holds no *.safetensors or pytorch_model*.bin")
def _(e):
    model = e.copy("b")
    weights(model).unlink()
    return e.linear("{a}", model)


@case("hub-id-not-cached", "acme/missing", "not in the Hugging Face cache")
def _(e):
    e.monkeypatch.setenv("HF_HUB_CACHE", str(e.tmp / "hub"))
    e.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return e.linear("{a}", "acme/missing")


@case("lora-adapter-missing", "no-adapter", "no such directory")
def _(e):
    return e.linear("{a}", f"{e.zoo['b']}+{e.tmp / 'no-adapter'}")


@case("lora-adapter-for-another-shape", "adapter", "lora_A.weight [2, 32]",
      "do not make a delta of model.layers.0.self_attn.q_proj.weight's shape [64, 64]")
def _(e):
    from safetensors.torch import save_file

    adapter = e.tmp / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": torch.zeros(2, 32), f"{prefix}.lora_B.weight": torch.zeros(64, 2)},
              adapter / "adapter_model.safetensors")
    return e.linear("{a}", f"{e.zoo['b']}+{adapter}")


@case("weights-file-is-a-directory", "model.safetensors: cannot read it", "Is a directory")
def _(e):
    model = e.copy("b")
    weights(model).unlink()
    (model / "model.safetensors").mkdir()
    return e.linear("{a}", model)


@case("weights-file-dangling-link", "model.safetensors: cannot read it", "No such file")
def _(e):
    model = e.copy("b")
    weights(model).unlink()
    (model / "model.safetensors").symlink_to(e.tmp / "gone.safetensors")
    return e.linear("{a}", model)


@case("index-points-outside", "points outside the model directory", "../")
def _(e):
    model = e.copy("sharded")
    index = model / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = "../../escape.safetensors"
    index.write_text(json.dumps(data))
    return e.linear("{a}", model)


@case("index-lists-missing-shard", "model-00002-of-00002.safetensors", "which is missing")
def _(e):
    model = e.copy("sharded")
    (model / "model-00002-of-00002.safetensors").unlink()
    return e.linear("{a}", model)


@case("index-not-json", "model.safetensors.index.json is not a valid index")
def _(e):
    model = e.copy("sharded")
    (model / "model.safetensors.index.json").write_text("{")
    return e.linear("{a}", model)


# ---- incompatible models ------------------------------------------------------------------


@case("missing-tensor", f"has no tensor {LAYER1_UP}", "b-lacks")
def _(e):
    model = e.copy("b", "b-lacks")
    change_tensors(model, drop=(LAYER1_UP,))
    return e.linear("{a}", model)


@case("shape-mismatch", f"merge of {LAYER1_UP}: shapes differ", "128x64", "64x128", "b-turned")
def _(e):
    model = e.copy("b", "b-turned")
    change_tensors(model, transpose=(LAYER1_UP,))
    return e.linear("{a}", model)


case("different-layer-counts", "different layer counts", "use `slices:`")(
    lambda e: e.linear("{a}", "{deep}"))
case("layer-range-beyond-model", "layer_range [2, 6] goes beyond", "which has 4 layers")(
    lambda e: e.config("merge_method: passthrough\nslices:\n"
                       "  - sources: [{{model: {a}, layer_range: [2, 6]}}]\n"))
case("mixed-architectures", "different architectures", "MistralForCausalLM", "--allow-crimes")(
    lambda e: e.linear("{a}", "{mistral}"))
case("slice-base-not-among-sources", "ties needs the base model among this slice's sources")(
    lambda e: e.config("merge_method: ties\nbase_model: {base}\nslices:\n  - sources:\n"
                       "      - {{model: {a}, layer_range: [0, 4], parameters: {{weight: 1}}}}\n"
                       "      - {{model: {b}, layer_range: [0, 4], parameters: {{weight: 1}}}}\n"))

# ---- damaged files ------------------------------------------------------------------------


def _damaged(e: Env, damage: Callable[[Path], None]) -> str:
    model = e.copy("b", "damaged")
    damage(weights(model))
    return e.linear("{a}", model)


case("header-oversized", "damaged/model.safetensors", "corrupt safetensors header",
     "header length 1099511627776")(lambda e: _damaged(e, lambda f: set_header_length(f, 2**40)))
case("header-longer-than-file", "damaged/model.safetensors", "corrupt safetensors header")(
    lambda e: _damaged(e, lambda f: set_header_length(f, f.stat().st_size)))
case("header-not-json", "damaged/model.safetensors", "not JSON")(
    lambda e: _damaged(e, lambda f: write_header(f, b"{garbage" + b" " * 64, split_header(f)[1])))
case("header-not-an-object", "damaged/model.safetensors", "not a JSON object")(
    lambda e: _damaged(e, lambda f: write_header(f, [1, 2], split_header(f)[1])))
case("header-entry-no-dtype", "damaged/model.safetensors", "header entry for", LAYER1_UP)(
    lambda e: _damaged(e, lambda f: edit_header(f, LAYER1_UP, dtype=None)))
case("header-size-disagrees", "damaged/model.safetensors", f"tensor {LAYER1_UP} has")(
    lambda e: _damaged(e, lambda f: edit_header(f, LAYER1_UP, shape=[128, 32])))
case("header-unknown-dtype", "damaged/model.safetensors", LAYER1_UP, "dtype Q4")(
    lambda e: _damaged(e, lambda f: edit_header(f, LAYER1_UP, dtype="Q4")))
case("header-fp8-dtype", "damaged/model.safetensors", LAYER1_UP, "dtype F8_E4M3", "cannot read")(
    lambda e: _damaged(e, lambda f: edit_header(f, LAYER1_UP, dtype="F8_E4M3", shape=[128, 128])))
case("file-truncated", "damaged/model.safetensors", "truncated", "re-download")(
    lambda e: _damaged(e, lambda f: truncate(f, -1000)))
case("file-three-bytes", "damaged/model.safetensors", "truncated safetensors file (3 bytes")(
    lambda e: _damaged(e, lambda f: truncate(f, 3)))
case("file-empty", "damaged/model.safetensors", "truncated safetensors file (0 bytes")(
    lambda e: _damaged(e, lambda f: truncate(f, 0)))


@case("bin-runs-code", "pytorch_model.bin", "not a weights-only PyTorch checkpoint, refused")
def _(e):
    model = e.copy("b", "evil")
    replace_with_bin(model, {"w": torch.zeros(2), "x": RunsCode(e.tmp / "pwned")})
    return e.linear("{a}", model)


@case("bin-raw-pickle-runs-code", "pytorch_model.bin", "refused")
def _(e):
    model = e.copy("b", "evil")
    replace_with_bin(model, {"w": RunsCode(e.tmp / "pwned")}, raw_pickle=True)
    return e.linear("{a}", model)


@case("bin-custom-class", "pytorch_model.bin", "refused", "convert it to safetensors")
def _(e):
    model = e.copy("b", "custom")
    replace_with_bin(model, {"w": torch.zeros(2), "meta": Custom()})
    return e.linear("{a}", model)


@case("bin-not-a-state-dict", "pytorch_model.bin", "not a state dict of tensors")
def _(e):
    model = e.copy("b", "list")
    replace_with_bin(model, [torch.zeros(2)])
    return e.linear("{a}", model)


@case("bin-complex-dtype", "pytorch_model.bin", "dtype complex64", "cannot read")
def _(e):
    model = e.copy("b", "complex")
    replace_with_bin(model, {LAYER1_UP: torch.zeros(128, 32, dtype=torch.complex64)})
    return e.linear("{a}", model)


@case("bin-garbage", "pytorch_model.bin", "refused")
def _(e):
    model = e.copy("b", "garbage")
    weights(model).unlink()
    (model / "pytorch_model.bin").write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)
    return e.linear("{a}", model)


# ---- damage found only while merging -------------------------------------------------------


@case("truncated-after-planning", "late/model.safetensors", "truncated")
def _(e):
    model = e.copy("b", "late")
    e.after_plan.append(lambda: truncate(weights(model), -5000))
    return e.linear("{a}", model)


@case("removed-after-planning", "late/model.safetensors", "cannot read tensor")
def _(e):
    model = e.copy("b", "late")
    e.after_plan.append(lambda: weights(model).unlink())
    return e.linear("{a}", model)


@case("nan-in-input", f"merge of {LAYER1_UP} (linear) produced", "NaN/Inf")
def _(e):
    model = e.copy("b", "nan")
    change_tensors(model, nan=(LAYER1_UP,))
    return e.linear("{a}", model)


@case("nan-over-an-old-model-with-force", "NaN/Inf", "holds no config.json")
def _(e):
    model = e.copy("b", "nan")
    change_tensors(model, nan=(LAYER1_UP,))
    copy_model(e.zoo["a"], e.out)  # a complete model from an earlier run: --force replaces it
    return e.linear("{a}", model), "--force"


# ---- the output directory -----------------------------------------------------------------


@case("out-is-an-input", "overlaps the input model")
def _(e):
    model = e.copy("a")
    e.out, e.out_is_model = model, True
    return e.linear(model, "{b}"), "--force"


@case("out-inside-an-input", "overlaps the input model")
def _(e):
    model = e.copy("a")
    e.out = model / "merged"
    return e.linear(model, "{b}")


@case("out-contains-an-input", "overlaps the input model")
def _(e):
    model = e.copy("a")
    e.out = model.parent
    return e.linear(model, "{b}"), "--force"


@case("out-is-a-link-to-an-input", "overlaps the input model")
def _(e):
    model = e.copy("a")
    e.out.symlink_to(model, target_is_directory=True)
    e.out_is_model = True
    return e.linear(model, "{b}"), "--force"


@case("out-not-empty", "is not empty", "--force", "--resume")
def _(e):
    e.out.mkdir()
    (e.out / "notes.txt").write_text("mine")
    return e.linear("{a}", "{b}")


@case("out-is-a-file", "exists and is not a directory")
def _(e):
    e.out.write_text("x")
    return e.linear("{a}", "{b}")


@case("out-under-a-file", "cannot create the output directory")
def _(e):
    (e.tmp / "file").write_text("x")
    e.out = e.tmp / "file" / "out"
    return e.linear("{a}", "{b}")


@case("resume-another-plan", "cannot resume", "plan fingerprint changed")
def _(e):
    (e.out / ".mergeflow").mkdir(parents=True)
    (e.out / ".mergeflow" / "journal").write_text("plan 0123456789abcdef\ndone x\n")
    return e.linear("{a}", "{b}"), "--resume"


@case("a-tensor-never-written", "output is incomplete", "1 tensor(s) were never written")
def _(e):
    from mergeflow.exec import tasks

    real = tasks.record_done

    def lose_one(journal, name):
        return None if name == LAYER1_UP else real(journal, name)
    e.monkeypatch.setattr(tasks, "record_done", lose_one)
    return e.linear("{a}", "{b}")


@case("shard-header-overwritten", "output is incomplete", "header differs from the plan")
def _(e):
    from mergeflow.exec import tasks

    real = tasks.finalize

    def clobber(path, size, *written):
        with open(path, "r+b") as f:
            f.seek(8)
            f.write(b"[")
        return real(path, size, *written)
    e.monkeypatch.setattr(tasks, "finalize", clobber)
    return e.linear("{a}", "{b}")


@case("no-cuda-device", "no CUDA device")
def _(e):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    return e.linear("{a}", "{b}"), "--device", "cuda"


def _run(env: Env, args: tuple | str, capsys) -> tuple[int, str]:
    config, *extra = (args,) if isinstance(args, str) else args
    import mergeflow.plan

    real = mergeflow.plan.plan_merge

    def plan_then_damage(*a, **kw):
        plan = real(*a, **kw)
        for hook in env.after_plan:
            hook()
        return plan
    env.monkeypatch.setattr(mergeflow.plan, "plan_merge", plan_then_damage)
    rc = main(["run", config, str(env.out), "--scheduler", "sync", "--quiet", *extra])
    return rc, capsys.readouterr().err


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_the_corpus_is_big_enough():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_a_clear_message(bad: Case, zoo, tmp_path, monkeypatch, capsys):
    env = Env(zoo, tmp_path, monkeypatch)
    args = bad.setup(env)
    before = _snapshot(env.out) if env.out_is_model else None
    rc, err = _run(env, args, capsys)
    assert rc == 2, err
    for words in bad.expect:
        assert words in err, f"{words!r} not in:\n{err}"
    assert ("\n" + err).count("\nerror: ") == 1 and "Traceback" not in err, err
    if before is not None:
        assert _snapshot(env.out) == before
        return
    for marker in ("config.json", "model.safetensors.index.json"):
        assert not (env.out / marker).exists(), f"{marker} left in {env.out}"
    assert not (tmp_path / "pwned").exists()  # no pickle ran code


# ---- the terminal, internal errors, security ----------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mergeflow.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_subprocess_refused_pickle_prints_only_the_message(zoo, tmp_path):
    env = Env(zoo, tmp_path, pytest.MonkeyPatch())
    model = env.copy("b", "evil")
    replace_with_bin(model, {"w": torch.zeros(2), "x": RunsCode(tmp_path / "pwned")})
    done = _cli("run", env.linear("{a}", model), str(env.out), "--quiet")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    assert "evil/pytorch_model.bin: not a weights-only PyTorch checkpoint, refused" in done.stderr
    assert "posix.system" in done.stderr  # the refused global is named
    assert not (tmp_path / "pwned").exists() and not env.out.exists()


def test_subprocess_worker_failure_on_the_default_scheduler(zoo, tmp_path):
    """A NaN found in a Dask worker of the default (distributed) scheduler: still one clean
    message naming the tensor, exit 2, and a dashboard that listened on 127.0.0.1 only."""
    env = Env(zoo, tmp_path, pytest.MonkeyPatch())
    model = env.copy("b", "nan")
    change_tensors(model, nan=(LAYER1_UP,))
    done = _cli("run", env.linear("{a}", model), str(env.out))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert f"error: merge of {LAYER1_UP} (linear) produced 8192 NaN/Inf values" in done.stderr
    assert "dashboard: http://127.0.0.1:" in done.stderr
    assert not (env.out / "config.json").exists()


def test_verbose_shows_the_traceback(zoo, tmp_path, monkeypatch, capsys):
    env = Env(zoo, tmp_path, monkeypatch)
    assert main(["run", env.linear("{a}", tmp_path / "nowhere"), str(env.out), "-v"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "MergeflowError" in err
    assert "error: " in err and "no such directory" in err


@pytest.mark.parametrize("verbose", [False, True])
def test_internal_error_exits_1_with_a_hint(zoo, tmp_path, monkeypatch, capsys, verbose):
    import mergeflow.plan

    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom")
    monkeypatch.setattr(mergeflow.plan, "plan_merge", broken)
    env = Env(zoo, tmp_path, monkeypatch)
    rc = main(["run", env.linear("{a}", "{b}"), str(env.out), *(["-v"] if verbose else [])])
    err = capsys.readouterr().err
    assert rc == 1
    assert "error: internal error: ZeroDivisionError: boom" in err and "bug in mergeflow" in err
    assert ("Traceback" in err) == verbose and ("rerun with -v" in err) == (not verbose)


def test_os_error_is_the_users_to_fix(zoo, tmp_path, monkeypatch, capsys):
    import mergeflow.plan

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/models/secret")
    monkeypatch.setattr(mergeflow.plan, "plan_merge", denied)
    env = Env(zoo, tmp_path, monkeypatch)
    assert main(["validate", env.linear("{a}", "{b}")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Permission denied: /models/secret") and "Traceback" not in err


def test_legacy_bin_checkpoint_is_read_weights_only(zoo, tmp_path):
    from mergeflow.sources.models import read_bin_header

    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(3, 2)}, path, _use_new_zipfile_serialization=False)
    info = read_bin_header(path)["w"]
    assert (info.dtype, info.shape) == ("F32", (3, 2))


def test_nothing_loads_remote_code_unasked():
    """Every from_pretrained / AutoX call in the package passes trust_remote_code explicitly,
    and never a literal True (it must come from --trust-remote-code)."""
    import ast

    import mergeflow

    root = Path(mergeflow.__file__).parent
    calls = 0
    for file in sorted(root.rglob("*.py")):
        if file.name == "testing.py":  # builds local test models only
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("from_pretrained", "from_config", "snapshot_download_code"):
                calls += 1
                kw = {k.arg: k.value for k in node.keywords}
                where = f"{file.relative_to(root)}:{node.lineno}"
                assert "trust_remote_code" in kw, f"{where}: pass trust_remote_code from the option"
                value = kw["trust_remote_code"]
                assert not (isinstance(value, ast.Constant) and value.value is True), where
    from mergeflow.cli import build_parser

    args = build_parser().parse_args(["run", "c.yml", "out"])
    assert args.trust_remote_code is False
    assert args.dashboard_address.startswith("127.0.0.1:")


def test_tensor_names_never_become_paths(zoo, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    model = copy_model(zoo["a"], tmp_path / "models" / "odd")
    state = load_file(weights(model))
    odd = {"../../escape.weight": torch.ones(2), "/etc/passwd.weight": torch.ones(2)}
    save_file({**state, **odd}, weights(model), metadata={"format": "pt"})
    cfg = tmp_path / "merge.yml"
    cfg.write_text(f"merge_method: passthrough\nmodels: [{{model: {model}}}]\n")
    before = sorted(p for p in tmp_path.rglob("*") if "out" not in p.parts)
    assert main(["run", str(cfg), str(tmp_path / "out"), "--scheduler", "sync", "--quiet"]) == 0
    assert sorted(p for p in tmp_path.rglob("*") if "out" not in p.parts) == before
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(out[k], v) for k, v in odd.items())


@pytest.mark.parametrize("name", ["../tokenizer.json", "a/b.json", "/etc/passwd", "..", "", "x\\..\\y"])
def test_output_path_takes_plain_names_only(tmp_path, name):
    from mergeflow.errors import MergeflowError
    from mergeflow.output.metadata import output_path

    assert output_path(tmp_path, "tokenizer.json") == tmp_path / "tokenizer.json"
    with pytest.raises(MergeflowError, match="not a plain file name"):
        output_path(tmp_path, name)


def test_default_cluster_listens_on_loopback_only(zoo, tmp_path, monkeypatch, capsys):
    """The default scheduler's dashboard and workers bind 127.0.0.1, and the link says so."""
    import psutil

    from mergeflow.exec import tasks

    seen = tmp_path / "listening"  # the task runs on a copy of this function (cloudpickle)
    real = tasks.finalize

    def look(*args):
        ips = {c.laddr.ip for c in psutil.Process().net_connections(kind="inet")
               if c.status == psutil.CONN_LISTEN}
        seen.write_text(" ".join(sorted(ips)))
        return real(*args)
    monkeypatch.setattr(tasks, "finalize", look)
    env = Env(zoo, tmp_path, monkeypatch)
    assert main(["run", env.linear("{a}", "{b}"), str(env.out)]) == 0
    assert seen.read_text() == "127.0.0.1"
    assert "dashboard: http://127.0.0.1:" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--memory-limit", "lots"], ["--out-shard-size", "big"]])
def test_bad_sizes_are_refused_before_anything_runs(tmp_path, capsys, option):
    with pytest.raises(SystemExit) as stop:
        main(["run", "merge.yml", str(tmp_path / "out"), *option])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option[0]}: not a size: '{option[1]}'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
