"""`mergeflow extract-lora` end to end on tiny float32 models: the adapter reproduces the
fine-tune (exactly at full rank, as the best rank-r approximation below), PEFT loads it, and
every scheduler, an interrupted run resumed, and process workers write the same bytes."""

from __future__ import annotations

import errno
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeflow.cli import main
from mergeflow.exec import extract_lora as tasks
from mergeflow.testing import make_model

P = "base_model.model."
SAME = "model.layers.1.mlp.up_proj.weight"  # left unchanged in the `frozen` fine-tune


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-models")
    out = {}
    for family in ("llama", "qwen2"):
        out[f"{family}-base"] = make_model(root / f"{family}-base", seed=1, family=family, dtype=torch.float32)
        out[family] = make_model(root / family, seed=2, base=out[f"{family}-base"], noise=0.01)
    frozen = make_model(root / "frozen", seed=3, base=out["llama-base"], noise=0.01)
    weights = load_file(frozen / "model.safetensors")
    weights[SAME] = load_file(out["llama-base"] / "model.safetensors")[SAME]
    save_file(weights, frozen / "model.safetensors", metadata={"format": "pt"})
    out["frozen"] = frozen
    # weights large enough that MKL runs an SVD on several threads when it may
    out["wide-base"] = make_model(root / "wide-base", seed=4, hidden=256, intermediate=384, layers=2,
                                  dtype=torch.float32)
    out["wide"] = make_model(root / "wide", seed=5, base=out["wide-base"])
    return out


def extract(ft: Path, base: Path, out: Path, *extra: str) -> int:
    return main(["extract-lora", "--model", str(ft), "--base-model", str(base), "--out-path", str(out),
                 "--quiet", "--dashboard-address", "127.0.0.1:0", *extra])


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file's bytes; README.md's with the output path taken out (its command names it)."""
    out = {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}
    out["README.md"] = out["README.md"].replace(str(directory).encode(), b"OUT")
    return out


def deltas(ft: Path, base: Path) -> dict[str, torch.Tensor]:
    a, b = load_file(ft / "model.safetensors"), load_file(base / "model.safetensors")
    return {n.removesuffix(".weight"): a[n] - b[n] for n in a if n.endswith("_proj.weight")}


def products(out: Path) -> dict[str, torch.Tensor]:
    t = load_file(out / "adapter_model.safetensors")
    return {n[len(P):-len(".lora_A.weight")]: t[n.replace("lora_A", "lora_B")] @ t[n]
            for n in t if n.endswith(".lora_A.weight")}


def peft_logits(base: Path, adapter: Path) -> tuple[torch.Tensor, list[str]]:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(model, adapter)
    return logits(model), [str(w.message) for w in caught if "deprecated" not in str(w.message)]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(4, 60).reshape(2, 28)).logits


def model_logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return logits(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_full_rank_reproduces_the_finetune(models, tmp_path, family):
    ft, base, out = models[family], models[f"{family}-base"], tmp_path / "lora"
    assert extract(ft, base, out, "--max-rank", "1000", "--scheduler", "sync") == 0
    assert {p.name for p in out.iterdir()} == {"adapter_model.safetensors", "adapter_config.json",
                                               "README.md", "extract_lora_report.json"}
    want, got = deltas(ft, base), products(out)
    assert set(got) == set(want) and len(got) == 28
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=2e-7)
    # modules_to_save (and qwen2's q/k/v biases) are the fine-tune's own bytes
    adapter, tuned = load_file(out / "adapter_model.safetensors"), load_file(ft / "model.safetensors")
    copied = {n[len(P):].replace(".base_layer", ""): t for n, t in adapter.items() if "lora_" not in n}
    assert len(copied) == (11 if family == "llama" else 23)
    assert all(torch.equal(t, tuned[n]) for n, t in copied.items())
    lora, said = peft_logits(base, out)
    assert said == []  # no missing or unexpected keys, nothing PEFT had to guess
    torch.testing.assert_close(lora, model_logits(ft), rtol=0, atol=1e-5)
    report = json.loads((out / "extract_lora_report.json").read_text())
    assert max(m["relative_error"] for m in report["modules"]) < 2e-6


def test_rank_r_is_the_best_rank_r_approximation(models, tmp_path):
    """Eckart-Young, checked against numpy's float64 SVD of each weight's change."""
    ft, base, out = models["llama"], models["llama-base"], tmp_path / "lora"
    assert extract(ft, base, out, "--max-rank", "4", "--scheduler", "sync") == 0
    got = products(out)
    report = {m["module"]: m for m in json.loads((out / "extract_lora_report.json").read_text())["modules"]}
    for name, d in deltas(ft, base).items():
        s = np.linalg.svd(d.double().numpy(), compute_uv=False)
        best = np.sqrt((s[4:] ** 2).sum())
        assert np.linalg.norm((d - got[name]).double().numpy()) == pytest.approx(best, rel=1e-5)
        assert report[name]["rank"] == 4
        assert report[name]["relative_error"] == pytest.approx(best / np.linalg.norm(s), rel=1e-5)


def test_sv_epsilon_counts_the_ranks(models, tmp_path):
    ft, base, out = models["frozen"], models["llama-base"], tmp_path / "lora"
    assert extract(ft, base, out, "--sv-epsilon", "0.05", "--scheduler", "sync") == 0
    config = json.loads((out / "adapter_config.json").read_text())
    report = {m["module"]: m["rank"] for m in json.loads((out / "extract_lora_report.json").read_text())["modules"]}
    for name, d in deltas(ft, base).items():  # numpy's count of singular values above 0.05
        assert report[name] == int((np.linalg.svd(d.double().numpy(), compute_uv=False) > 0.05).sum()), name
    assert report[SAME.removesuffix(".weight")] == 0 and len(set(report.values())) > 3
    assert config["r"] == max(report.values())
    assert config["rank_pattern"] == {n: r for n, r in report.items() if 0 < r < config["r"]}
    assert config["exclude_modules"] == [SAME.removesuffix(".weight")]
    shapes = {n[len(P):-len(".lora_A.weight")]: t.shape[0]
              for n, t in load_file(out / "adapter_model.safetensors").items() if n.endswith("lora_A.weight")}
    assert shapes == {n: r for n, r in report.items() if r}


def test_a_module_without_a_lora_is_left_to_the_base(models, tmp_path):
    """--sv-epsilon below every real singular value: full ranks, except the unchanged weight,
    which has none; PEFT leaves that module alone and reproduces the fine-tune."""
    ft, base, out = models["frozen"], models["llama-base"], tmp_path / "lora"
    assert extract(ft, base, out, "--sv-epsilon", "1e-4", "--max-rank", "1000") == 0
    lora, said = peft_logits(base, out)
    assert said == []
    torch.testing.assert_close(lora, model_logits(ft), rtol=0, atol=1e-5)


@pytest.mark.parametrize("extra", [(), ("--sv-epsilon", "0.05")], ids=["ranks-from-shapes", "sv-epsilon"])
def test_every_scheduler_writes_the_same_bytes(models, tmp_path, extra):
    """MKL's SVD depends on the thread count: sync runs torch on every core, the threads and
    distributed schedulers on one thread per task; the SVD runs on one thread everywhere."""
    ft, base = models["wide"], models["wide-base"]
    outs = {}
    for scheduler in ("sync", "threads", "distributed"):
        assert extract(ft, base, tmp_path / scheduler, "--max-rank", "64", "--scheduler", scheduler, *extra) == 0
        outs[scheduler] = snapshot(tmp_path / scheduler)
    assert outs["sync"] == outs["threads"] == outs["distributed"]


@pytest.mark.cluster
def test_process_workers_write_the_same_bytes(models, tmp_path):
    """Two process workers of two threads each (torch on two threads there)."""
    ft, base = models["wide"], models["wide-base"]
    assert extract(ft, base, tmp_path / "sync", "--max-rank", "64", "--scheduler", "sync") == 0
    assert extract(ft, base, tmp_path / "procs", "--max-rank", "64", "--processes", "--workers", "2",
                   "--threads-per-worker", "2") == 0
    assert snapshot(tmp_path / "procs") == snapshot(tmp_path / "sync")


def fail_after(monkeypatch, writes: int) -> list[str]:
    """Let `writes` tensor writes through, then fail every later one as a full disk would."""
    real, seen = tasks.write_at, []

    def write_at(path, offset, data):
        if len(seen) >= writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        seen.append(path)
        return real(path, offset, data)
    monkeypatch.setattr(tasks, "write_at", write_at)
    return seen


@pytest.mark.parametrize("extra", [(), ("--sv-epsilon", "0.05")], ids=["ranks-from-shapes", "sv-epsilon"])
def test_an_interrupted_extraction_resumes_to_the_same_bytes(models, tmp_path, monkeypatch, capsys, extra):
    ft, base = models["llama"], models["llama-base"]
    assert extract(ft, base, tmp_path / "reference", "--max-rank", "16", "--scheduler", "sync", *extra) == 0
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        fail_after(m, 20)
        assert extract(ft, base, out, "--max-rank", "16", "--scheduler", "sync", *extra) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "--resume" in err
    assert not (out / "adapter_config.json").exists()
    journaled = [line for part in (out / ".mergeflow").glob("journal*")
                 for line in part.read_text().splitlines() if line.startswith("done ")]
    finished = sum(line.endswith(".lora_B.weight") for line in journaled)
    assert 0 < finished <= 10  # of 20 writes, at most 10 pairs of factors
    if extra:
        assert len(list((out / ".mergeflow" / "factors").glob("*.safetensors"))) == 28
    svds = []
    real_decompose = tasks.decompose

    def decompose(*a, **k):
        svds.append(1)
        return real_decompose(*a, **k)
    monkeypatch.setattr(tasks, "decompose", decompose)
    assert extract(ft, base, out, "--max-rank", "16", "--scheduler", "sync", "--resume", *extra) == 0
    assert snapshot(out) == snapshot(tmp_path / "reference")
    # each module is decomposed once over both runs; with --sv-epsilon all were, into their
    # scratch files, before the first factor was copied into the adapter
    assert len(svds) == (0 if extra else 28 - finished)


def test_command_line_errors_and_mergekit_options(models, tmp_path, capsys):
    ft, base, out = models["llama"], models["llama-base"], tmp_path / "lora"
    out.mkdir()
    (out / "old.txt").write_text("x")
    assert extract(ft, base, out) == 2
    assert "is not empty; --force overwrites it" in capsys.readouterr().err
    assert extract(ft, tmp_path / "missing", tmp_path / "o2") == 2
    assert "no such directory" in capsys.readouterr().err
    assert extract(ft, base, tmp_path / "o3", "--max-rank", "2", "--scheduler", "sync",
                   "--lazy-unpickle", "--no-copy-tokenizer", "--random-seed", "4", "--no-write-model-card") == 0
    err = capsys.readouterr().err
    assert "note: --lazy-unpickle: not needed" in err and "note: --copy-tokenizer: not used" in err
    assert "note: --random-seed: not needed" in err
    assert not (tmp_path / "o3" / "README.md").exists()
    if not torch.cuda.is_available():
        assert extract(ft, base, tmp_path / "o4", "--cuda") == 2
        assert "no CUDA device is available" in capsys.readouterr().err


def test_an_extraction_stopped_while_decomposing_keeps_its_scratch_factors(models, tmp_path, monkeypatch, capsys):
    """--sv-epsilon: stopped in the first graph, resumed: the modules with a scratch file are
    not decomposed again, and the adapter is the uninterrupted one."""
    ft, base, out = models["llama"], models["llama-base"], tmp_path / "out"
    assert extract(ft, base, tmp_path / "reference", "--sv-epsilon", "0.05", "--scheduler", "sync") == 0
    real_save, saved = tasks.save_file, []

    def save_file(*a, **k):
        if len(saved) == 5:
            raise OSError(errno.EIO, "Input/output error")
        saved.append(1)
        return real_save(*a, **k)
    with monkeypatch.context() as m:
        m.setattr(tasks, "save_file", save_file)
        assert extract(ft, base, out, "--sv-epsilon", "0.05", "--scheduler", "sync") == 2
    assert "Input/output error" in capsys.readouterr().err
    assert len(list((out / ".mergeflow" / "factors").glob("*.safetensors"))) == 5
    svds, real_decompose = [], tasks.decompose
    monkeypatch.setattr(tasks, "decompose", lambda *a, **k: svds.append(1) or real_decompose(*a, **k))
    assert extract(ft, base, out, "--sv-epsilon", "0.05", "--scheduler", "sync", "--resume") == 0
    assert len(svds) == 28 - 5
    assert snapshot(out) == snapshot(tmp_path / "reference")
    assert not (out / ".mergeflow").exists()


@pytest.mark.cluster
def test_an_existing_cluster_writes_the_same_bytes(models, tmp_path):
    """`--scheduler-address`: a `dask scheduler` and a `dask worker` of two threads, started
    apart; the workers are checked first (inputs, output directory), then extract."""
    import subprocess
    import sys
    import time

    ft, base = models["wide"], models["wide-base"]
    assert extract(ft, base, tmp_path / "sync", "--max-rank", "64", "--scheduler", "sync") == 0
    procs, info = [], tmp_path / "scheduler.json"
    try:
        procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host",
                                       "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0",
                                       "--scheduler-file", str(info)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        while not info.exists() or "address" not in info.read_text():
            assert time.monotonic() < deadline and procs[0].poll() is None, "no dask scheduler"
            time.sleep(0.1)
        address = json.loads(info.read_text())["address"]
        procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address,
                                       "--host", "127.0.0.1", "--nthreads", "2", "--dashboard-address",
                                       "127.0.0.1:0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        assert extract(ft, base, tmp_path / "remote", "--max-rank", "64", "--scheduler-address", address) == 0
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(timeout=30)
    assert snapshot(tmp_path / "remote") == snapshot(tmp_path / "sync")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_extraction_matches_cpu(models, tmp_path):
    """cuSOLVER's SVD is not MKL's: the same ranks and products to float32 rounding."""
    ft, base = models["frozen"], models["llama-base"]
    for device in ("cpu", "cuda"):
        assert extract(ft, base, tmp_path / device, "--sv-epsilon", "0.05", "--device", device) == 0
    assert (json.loads((tmp_path / "cpu" / "adapter_config.json").read_text())
            == json.loads((tmp_path / "cuda" / "adapter_config.json").read_text()))
    cpu, cuda = products(tmp_path / "cpu"), products(tmp_path / "cuda")
    for name in cpu:
        torch.testing.assert_close(cuda[name], cpu[name], rtol=0, atol=1e-6)
