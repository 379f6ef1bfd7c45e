"""mergekit-yaml's flags on `mergeflow run`: each does what it does in mergekit 0.1.5, or is
accepted with one line saying why mergeflow does not need it; sizes as mergekit spells them;
`mergeflow CONFIG OUT` typed as for mergekit-yaml."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from mergeflow.cli import EPILOG, build_parser, main
from mergeflow.cli.run import NOT_NEEDED, _device
from mergeflow.exec import tasks
from mergeflow.exec.options import RunOptions
from mergeflow.output import bin as binout

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture
def linear(family, write_config) -> Path:
    return write_config(f"""merge_method: linear
models:
  - model: {family['a']}
    parameters: {{weight: 0.3}}
  - model: {family['b']}
    parameters: {{weight: 0.7}}
dtype: bfloat16
""")


@pytest.fixture
def torch_threads():
    """cmd_run sets torch's threads for the process; give the other tests theirs back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def run(config: Path, out: Path, *flags: str) -> int:
    return main(["run", str(config), str(out), "--scheduler", "sync", "--quiet", *flags])


def safetensors_of(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


def bins_of(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("*.bin")) for k, v in torch.load(f, weights_only=True).items()}


def names(out: Path) -> set[str]:
    return {p.name for p in out.iterdir()}


# ----------------------------------------------------------------------------- output settings


def test_no_safe_serialization_writes_bin_shards_that_transformers_loads(linear, tmp_path):
    from transformers import AutoModelForCausalLM

    st, pt = tmp_path / "st", tmp_path / "pt"
    assert run(linear, st, "--out-shard-size", "200K") == 0
    assert run(linear, pt, "--out-shard-size", "200K", "--no-safe-serialization") == 0
    n = len(list(st.glob("model-*.safetensors")))
    assert n == 2  # 394 KB of tensors in shards of at most 200 KB
    shards = {f"pytorch_model-{k:05d}-of-{n:05d}.bin" for k in range(1, n + 1)}
    assert names(pt) == names(st) - {f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)} \
        - {"model.safetensors.index.json"} | shards | {"pytorch_model.bin.index.json"}
    index = json.loads((pt / "pytorch_model.bin.index.json").read_text())
    st_index = json.loads((st / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == st_index["metadata"]["total_size"]
    assert index["weight_map"] == {t: f.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
                                   for t, f in st_index["weight_map"].items()}
    expected, got = safetensors_of(st), bins_of(pt)
    assert list(got) == list(expected) and len(got) == 39
    for name, t in expected.items():
        assert got[name].dtype == t.dtype == torch.bfloat16 and torch.equal(got[name], t), name
    loaded = AutoModelForCausalLM.from_pretrained(pt, dtype=torch.bfloat16).state_dict()
    reference = AutoModelForCausalLM.from_pretrained(st, dtype=torch.bfloat16).state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_one_bin_shard_has_no_index_and_old_bins_go(linear, tmp_path):
    out = tmp_path / "out"
    assert run(linear, out, "--out-shard-size", "200K", "--no-safe-serialization") == 0
    assert run(linear, out, "--force", "--no-safe-serialization") == 0  # now one shard
    assert {p.name for p in out.glob("pytorch_model*")} == {"pytorch_model.bin"}
    assert not list(out.glob("*.safetensors"))
    assert set(torch.load(out / "pytorch_model.bin", weights_only=True)) == set(safetensors_of(
        _merged(linear, tmp_path / "st")))


def _merged(config: Path, out: Path) -> Path:
    assert run(config, out) == 0
    return out


def test_interrupted_bin_conversion_resumes_to_the_same_tensors(linear, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    real, calls = binout.shard_to_bin, []

    def disk_full_on_the_second(src, dst, order):
        calls.append(dst.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(dst))
        real(src, dst, order)
    monkeypatch.setattr(binout, "shard_to_bin", disk_full_on_the_second)
    assert run(linear, out, "--out-shard-size", "200K", "--no-safe-serialization") == 2
    assert "writing the metadata failed (No space left on device" in capsys.readouterr().err
    assert not (out / "config.json").exists() and not (out / "pytorch_model.bin.index.json").exists()
    assert not (out / "model-00001-of-00002.safetensors").exists()  # converted, then removed
    monkeypatch.setattr(binout, "shard_to_bin", real)
    assert run(linear, out, "--out-shard-size", "200K", "--no-safe-serialization", "--resume") == 0
    expected = safetensors_of(_merged(linear, tmp_path / "st"))
    got = bins_of(out)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert (out / "config.json").exists() and not list(out.glob("*.safetensors"))


def test_no_copy_tokenizer_leaves_no_tokenizer_files(linear, tmp_path):
    assert run(linear, tmp_path / "with") == 0
    assert run(linear, tmp_path / "without", "--no-copy-tokenizer") == 0
    assert set(TOKENIZER) <= names(tmp_path / "with")
    assert names(tmp_path / "without") == names(tmp_path / "with") - set(TOKENIZER)
    assert "generation_config.json" in names(tmp_path / "without")  # not a tokenizer file
    assert run(linear, tmp_path / "again", "--no-copy-tokenizer", "--copy-tokenizer") == 0  # the last wins
    assert set(TOKENIZER) <= names(tmp_path / "again")


def test_no_copy_tokenizer_still_saves_a_tokenizer_the_config_builds(family, write_config, tmp_path):
    """As in mergekit: tokenizer_source builds a tokenizer, which is saved whatever the flag."""
    cfg = write_config(f"merge_method: linear\nmodels:\n  - model: {family['a']}\n    parameters: "
                       f"{{weight: 0.5}}\n  - model: {family['b']}\n    parameters: {{weight: 0.5}}\n"
                       f"tokenizer_source: base\n")
    assert run(cfg, tmp_path / "out", "--no-copy-tokenizer") == 0
    assert set(TOKENIZER) <= names(tmp_path / "out")


def test_no_copy_tokenizer_with_a_chat_template_says_it_is_not_saved(family, write_config, tmp_path, capsys):
    cfg = write_config(f"merge_method: linear\nmodels:\n  - model: {family['a']}\n    parameters: "
                       f"{{weight: 0.5}}\n  - model: {family['b']}\n    parameters: {{weight: 0.5}}\n"
                       "chat_template: chatml\n")
    assert run(cfg, tmp_path / "out", "--no-copy-tokenizer") == 0
    assert ("warning: --no-copy-tokenizer: no tokenizer is saved, so the config's chat_template is not "
            "saved either (as in mergekit)\n") in capsys.readouterr().err
    assert not {"tokenizer_config.json", "chat_template.jinja"} & names(tmp_path / "out")


def test_no_write_model_card_writes_no_readme_and_no_config_copy(linear, tmp_path):
    assert run(linear, tmp_path / "with") == 0
    assert run(linear, tmp_path / "without", "--no-write-model-card") == 0
    assert {"README.md", "mergekit_config.yml"} <= names(tmp_path / "with")
    assert names(tmp_path / "without") == names(tmp_path / "with") - {"README.md", "mergekit_config.yml"}
    assert safetensors_of(tmp_path / "without").keys() == safetensors_of(tmp_path / "with").keys()


# ----------------------------------------------------------------------------- performance flags


def test_num_threads_sync_gives_torch_n_threads(linear, tmp_path, monkeypatch, torch_threads):
    seen = []
    real = tasks.finalize

    def look(*args):
        seen.append(torch.get_num_threads())
        return real(*args)
    monkeypatch.setattr(tasks, "finalize", look)
    assert run(linear, tmp_path / "out", "-j", "3") == 0
    assert seen == [3]
    assert run(linear, tmp_path / "again", "--num-threads=2") == 0
    assert seen == [3, 2]


def test_num_threads_sizes_the_local_cluster(linear, tmp_path, monkeypatch, torch_threads):
    """The default scheduler: one worker with 3 threads (3 tasks at once), 1 torch thread each."""
    seen = tmp_path / "seen"
    real = tasks.finalize

    def look(*args):  # runs on a copy of this function (cloudpickle): files only
        from distributed import get_worker

        seen.write_text(f"{get_worker().state.nthreads} {torch.get_num_threads()}")
        return real(*args)
    monkeypatch.setattr(tasks, "finalize", look)
    assert main(["run", str(linear), str(tmp_path / "out"), "--quiet", "--dashboard-address",
                 "127.0.0.1:0", "-j", "3"]) == 0
    assert seen.read_text() == "3 1"


@pytest.mark.parametrize("flags, workers, threads", [
    (["-j", "6"], None, 6),
    (["-j", "6", "--workers", "2"], 2, 3),
    (["-j", "6", "--threads-per-worker", "4"], None, 4),
    (["-j", "6", "--processes"], 6, None),
    (["-j", "6", "--processes", "--threads-per-worker", "2"], 3, 2),
    (["-j", "6", "--scheduler", "threads"], None, 6),
    (["-j", "6", "--scheduler", "sync"], None, None),
])
def test_num_threads_is_shared_among_workers_and_their_threads(linear, tmp_path, monkeypatch, torch_threads,
                                                               flags, workers, threads):
    from mergeflow.output import merge

    got = []
    monkeypatch.setattr(merge, "run_merge", lambda plan, out, options: got.append(options) or
                        SimpleNamespace(text=lambda: "merged"))
    assert main(["run", str(linear), str(tmp_path / "out"), "--quiet", *flags]) == 0
    assert (got[0].workers, got[0].threads_per_worker) == (workers, threads)


def test_num_threads_on_an_existing_cluster_is_refused(linear, tmp_path, capsys):
    assert main(["run", str(linear), str(tmp_path / "out"), "-j", "2", "--scheduler-address",
                 "tcp://127.0.0.1:9"]) == 2
    assert "error: -j/--num-threads sizes the local workers; an existing Dask cluster" in capsys.readouterr().err


@pytest.mark.parametrize("flags, device", [
    ([], "cpu"), (["--cuda"], "cuda"), (["--no-cuda"], "cpu"), (["--cuda", "--no-cuda"], "cpu"),
    (["--cuda", "--device", "cuda:1"], "cuda:1"), (["--cuda", "--device", "cpu"], "cpu"),
    (["--multi-gpu"], "cuda"), (["--gpu-rich"], "cuda"), (["--device", "cuda:0"], "cuda:0"),
    (["--multi-gpu", "--device", "auto"], "cuda"), (["--multi-gpu", "--device", "cuda"], "cuda"),
])
def test_cuda_flags_choose_the_device(flags, device):
    assert _device(build_parser().parse_args(["run", "c.yml", "out", *flags])) == device


def test_device_auto_is_cuda_only_where_there_is_one():
    args = build_parser().parse_args(["run", "c.yml", "out", "--device", "auto"])
    assert _device(args) == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("flags, message", [
    (["--multi-gpu", "--device", "cpu"], "--multi-gpu runs on every GPU (--device cuda); it cannot be "
                                         "combined with --device cpu. Drop one of them"),
    (["--gpu-rich", "--device", "cuda:1"], "--gpu-rich runs on every GPU (--device cuda); it cannot be "
                                           "combined with --device cuda:1"),
])
def test_every_gpu_flags_refuse_another_device(linear, tmp_path, capsys, flags, message):
    assert run(linear, tmp_path / "out", *flags) == 2
    assert f"error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_is_device_cuda(linear, tmp_path, capsys):
    """Without a GPU, --cuda fails exactly as --device cuda does."""
    assert main(["run", str(linear), str(tmp_path / "a"), "--quiet", "--cuda"]) == 2
    assert main(["run", str(linear), str(tmp_path / "b"), "--quiet", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: --device cuda: no CUDA device is available here; use --device cpu"] * 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_merges_on_the_gpu_as_device_cuda(linear, tmp_path):
    assert main(["run", str(linear), str(tmp_path / "a"), "--quiet", "--cuda"]) == 0
    assert main(["run", str(linear), str(tmp_path / "b"), "--quiet", "--device", "cuda"]) == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_flags_mergeflow_does_not_need_say_why_in_one_line_each(linear, tmp_path, capsys):
    plain = _merged(linear, tmp_path / "plain")
    capsys.readouterr()
    cache = tmp_path / "lora-cache"
    flags = ["--lazy-unpickle", "--low-cpu-memory", "--read-to-gpu", "--async-write", "--write-threads", "4",
             "--clone-tensors", "--lora-merge-cache", str(cache)]
    assert run(linear, tmp_path / "out", *flags) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert notes == [f"note: --{flag.replace('_', '-')} is not needed: {why}" for flag, why in NOT_NEEDED.items()]
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()
    assert not cache.exists()  # mergekit would store merged LoRA models there; nothing to store


def test_their_off_forms_say_nothing(linear, tmp_path, capsys):
    assert run(linear, tmp_path / "out", "--no-lazy-unpickle", "--no-low-cpu-memory", "--no-read-to-gpu",
               "--no-async-write", "--no-clone-tensors") == 0
    assert "note:" not in capsys.readouterr().err


def test_gpu_rich_says_what_it_runs_as(linear, tmp_path, capsys):
    run(linear, tmp_path / "out", "--gpu-rich")  # needs a GPU; the note comes first either way
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("note: --gpu-rich runs as --device cuda (every GPU, one worker each); the "
                      "--low-cpu-memory and --read-to-gpu it implies are not needed: results go to OUT as "
                      "they are computed and inputs to the GPU as they are read")


def test_quiet_and_no_quiet(linear, tmp_path, capsys):
    assert main(["run", str(linear), str(tmp_path / "a"), "--scheduler", "sync", "--quiet"]) == 0
    assert "tensors, " not in capsys.readouterr().err
    assert main(["run", str(linear), str(tmp_path / "b"), "--scheduler", "sync", "--quiet", "--no-quiet"]) == 0
    assert "| 39/39 tensors, " in capsys.readouterr().err


# ----------------------------------------------------------------------------- storage


def hub_cache(root: Path, repo: str, model: Path) -> Path:
    """A Hugging Face cache holding `model` as the snapshot of `repo` at main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    entry = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model, entry / "snapshots" / commit)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)
    return root


def test_transformers_cache_is_where_hub_models_are_found(family, write_config, tmp_path, monkeypatch, capsys):
    cache = hub_cache(tmp_path / "my-cache", "org/tiny-a", family["a"])
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))  # restored after the test
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = write_config(f"merge_method: linear\nmodels:\n  - model: org/tiny-a\n    parameters: {{weight: 0.3}}\n"
                       f"  - model: {family['b']}\n    parameters: {{weight: 0.7}}\ndtype: bfloat16\n")
    assert run(cfg, tmp_path / "without") == 2
    assert "org/tiny-a: not a local directory and not in the Hugging Face cache" in capsys.readouterr().err
    assert run(cfg, tmp_path / "out", "--transformers-cache", str(cache)) == 0
    local = write_config(cfg.read_text().replace("org/tiny-a", str(family["a"])), "local.yml")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == \
        (_merged(local, tmp_path / "local") / "model.safetensors").read_bytes()


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("option, text, expected", [
    ("--out-shard-size", "5B", 5_000_000_000), ("--out-shard-size", "4GiB", 2**32),
    ("--out-shard-size", "4GB", 4_000_000_000), ("--out-shard-size", "500M", 500_000_000),
    ("--memory-limit", "4GiB", 2**32), ("--memory-limit", "5B", 5_000_000_000),
    ("--memory-limit", "auto", "auto"),
])
def test_size_options_read_mergekit_and_byte_units(option, text, expected):
    args = build_parser().parse_args(["run", "c.yml", "out", option, text])
    value = getattr(args, option[2:].replace("-", "_"))
    if option == "--memory-limit":  # kept as written (messages quote it); RunOptions reads it
        value = RunOptions(memory_limit=value).memory_limit
    assert value == expected


@pytest.mark.parametrize("argv, message", [
    (["--out-shard-size", "0"], "argument --out-shard-size: must be more than 0 bytes: '0'"),
    (["--out-shard-size=-5GB"], "argument --out-shard-size: must be more than 0 bytes: '-5GB'"),
    (["--out-shard-size", "-1"], "argument --out-shard-size: must be more than 0 bytes: '-1'"),
    (["--memory-limit", "0"], "argument --memory-limit: must be more than 0 bytes: '0'"),
    (["--memory-limit", "0GiB"], "argument --memory-limit: must be more than 0 bytes: '0GiB'"),
    (["-j", "0"], "argument -j/--num-threads: must be at least 1: '0'"),
    (["--num-threads", "two"], "argument -j/--num-threads: not a whole number: 'two'"),
])
def test_zero_and_negative_sizes_exit_2_naming_the_option(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        main(["run", "merge.yml", str(tmp_path / "out"), *argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_plan_takes_the_same_sizes(linear, capsys):
    assert main(["plan", str(linear), "--out-shard-size", "200K"]) == 0
    assert "shards:         2 (model-00001-of-00002.safetensors, model-00002-of-00002.safetensors)" \
        in capsys.readouterr().out


# ----------------------------------------------------------------------------- habits and help


@pytest.mark.parametrize("argv, suggestion", [
    (["merge.yml", "out"], "mergeflow run merge.yml out"),
    (["merge.yml", "out", "--cuda", "-j", "4"], "mergeflow run merge.yml out --cuda -j 4"),
    (["--cuda", "my config.yaml", "out"], "mergeflow run --cuda 'my config.yaml' out"),
])
def test_mergekit_yaml_habit_is_pointed_at_mergeflow_run(tmp_path, capsys, monkeypatch, argv, suggestion):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    config = next(a for a in argv if a.endswith((".yml", ".yaml")))
    assert capsys.readouterr().err == (f"mergeflow: error: {config!r} is not a command. mergekit-yaml CONFIG "
                                       f"OUT is `mergeflow run CONFIG OUT` here; did you mean `{suggestion}`?\n")
    assert not (tmp_path / "out").exists()


def test_a_config_file_without_a_yaml_name_is_recognised(tmp_path, capsys):
    config = tmp_path / "merge.conf"
    config.write_text("merge_method: linear\n")
    assert main([str(config), str(tmp_path / "out")]) == 2
    assert "did you mean `mergeflow run " in capsys.readouterr().err


def test_an_unknown_command_is_still_argparse_s_error(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["rn"])
    assert stop.value.code == 2 and "invalid choice: 'rn'" in capsys.readouterr().err


def _run_parser():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["run"]


def test_run_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for action in _run_parser()._actions:
        for option in action.option_strings:
            assert option in text, option
        assert action.help, action.option_strings


def test_top_help_and_readme_name_every_mergekit_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    top = " ".join(capsys.readouterr().out.split())
    readme = (ROOT / "README.md").read_text()
    group = next(g for g in _run_parser()._action_groups if g.title == "mergekit-yaml's flags")
    for action in group._group_actions:
        long = next(o for o in action.option_strings if o.startswith("--") and not o.startswith("--no-"))
        assert long in top and long in " ".join(EPILOG.split()), long
        assert f"`{long}" in readme, long
    for action in _run_parser()._actions:  # README documents every flag of run
        for option in action.option_strings:
            if option not in ("-h", "--help"):
                assert option in readme, option
