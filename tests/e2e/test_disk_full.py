"""A full disk: a clear error, nothing that looks complete, and --resume once there is room.

Where the machine allows it (root, `mount -t tmpfs`), the output goes to a small tmpfs; the
shards' blocks are reserved up front (fallocate), so a disk too small fails before any tensor
is read. A filesystem without fallocate, or a disk that fills later, fails at write time.
Without mount rights, a writer that raises ENOSPC (os.pwrite) stands in for the disk.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from mergeflow.cli import main
from mergeflow.exec import read
from mergeflow.exec import write as shards

PAGE = os.sysconf("SC_PAGE_SIZE")
MARKERS = ("config.json", "model.safetensors.index.json")


@pytest.fixture
def config(family, tmp_path) -> str:
    path = tmp_path / "merge.yml"
    path.write_text(f"merge_method: linear\nmodels:\n  - model: {family['a']}\n    parameters: "
                    f"{{weight: 0.5}}\n  - model: {family['b']}\n    parameters: {{weight: 0.5}}\n")
    return str(path)


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a tmpfs directory of `size` bytes; resize(size) grows it; unmounted after."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = []

    def mount(size: int, remount: bool = False) -> Path:
        opts = f"{'remount,' if remount else ''}size={size}"
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    if mounted:
        subprocess.run(["umount", str(where)], check=True)


def shard_size(family) -> int:
    return sum(f.stat().st_size for f in family["a"].glob("*.safetensors"))  # same tensors out


def run(config: str, out: Path, *extra: str) -> int:
    return main(["run", config, str(out), "--scheduler", "sync", "--quiet", *extra])


def assert_not_complete(out: Path) -> None:
    for marker in MARKERS:
        assert not (out / marker).exists(), marker
    assert not list(out.glob("*.tmp"))


def count_loads(monkeypatch) -> list[str]:
    """The input tensors opened for reading, by name."""
    loaded: list[str] = []
    real = read.Stored.__init__

    def opened(self, src, resident):
        loaded.append(src.tensor)
        real(self, src, resident)
    monkeypatch.setattr(read.Stored, "__init__", opened)
    return loaded


def test_too_small_disk_fails_before_any_tensor_is_read(family, config, small_disk, monkeypatch, capsys):
    disk = small_disk(shard_size(family) // 2)
    loaded = count_loads(monkeypatch)
    assert run(config, disk / "out") == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "No tensor was read" in err, err
    assert "cannot create" in err and "model.safetensors" in err and "Traceback" not in err
    assert loaded == []
    assert_not_complete(disk / "out")
    assert (disk / "out" / "model.safetensors").stat().st_size == 0  # the space is given back


def test_disk_full_while_writing_then_resume(family, config, small_disk, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(shards, "_libc_fallocate", lambda: None)  # a filesystem without fallocate
    disk = small_disk(shard_size(family) // 2)
    out = disk / "out"
    assert run(config, out) == 2
    err = capsys.readouterr().err
    assert "write of model." in err and "No space left on device" in err, err
    assert "holds no config.json" in err and "--resume" in err and "Traceback" not in err
    assert_not_complete(out)
    journal = "".join(p.read_text() for p in (out / ".mergeflow").glob("journal*")).splitlines()  # + parts
    written = {line[5:] for line in journal if line.startswith("done ")}
    assert written  # some tensors made it before the disk filled
    # room again: --resume finishes without redoing the written tensors, same bytes as a clean run
    small_disk(4 * shard_size(family), remount=True)
    loaded = count_loads(monkeypatch)
    assert run(config, out, "--resume") == 0
    assert f"{len(written)} tensors were already done" in capsys.readouterr().err
    assert not written & set(loaded)
    assert run(config, tmp_path / "clean") == 0
    same = (out / "model.safetensors").read_bytes() == (tmp_path / "clean" / "model.safetensors").read_bytes()
    assert same and (out / "config.json").exists()


def test_disk_full_while_writing_metadata(family, config, small_disk, capsys):
    # room for the shard and the journal, not for the 14 KB tokenizer.json after them
    pages = -(-shard_size(family) // PAGE) + 2
    disk = small_disk(pages * PAGE)
    out = disk / "out"
    assert run(config, out) == 2
    err = capsys.readouterr().err
    assert "writing the metadata failed" in err and "No space left on device" in err, err
    assert "--resume" in err and "Traceback" not in err
    assert_not_complete(out)
    assert (out / ".mergeflow" / "journal").exists()  # kept for --resume
    small_disk(4 * shard_size(family), remount=True)
    assert run(config, out, "--resume") == 0
    assert "39 tensors were already done" in capsys.readouterr().err  # 4 layers x 9 + 3: all
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()


def test_enospc_from_the_writer(config, tmp_path, monkeypatch, capsys):
    """No mount needed: os.pwrite raises ENOSPC once the tensors start."""
    real = os.pwrite

    def full(fd, data, offset):
        if offset > 0:  # past the header (written first, at 0): a tensor
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full)
    out = tmp_path / "out"
    assert run(config, out) == 2
    err = capsys.readouterr().err
    assert "write of model." in err and "No space left on device" in err and "Traceback" not in err
    assert_not_complete(out)
    assert (out / ".mergeflow" / "journal").read_text().splitlines()[1:] == []  # nothing recorded
