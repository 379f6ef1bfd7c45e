"""output/bin.py: a safetensors shard rewritten as a torch.save'd state dict, tensor for tensor."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeflow.output.bin import bin_names, shard_to_bin


def test_names_follow_transformers():
    assert bin_names(1) == ["pytorch_model.bin"]
    assert bin_names(3) == ["pytorch_model-00001-of-00003.bin", "pytorch_model-00002-of-00003.bin",
                            "pytorch_model-00003-of-00003.bin"]


def test_every_dtype_and_shape_survives(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(3, 5, generator=g).bfloat16(),
        "odd": torch.randn(7, generator=g).half(),  # 14 bytes: the next tensor starts unaligned
        "f32": torch.randn(2, 3, 4, generator=g),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "mask": torch.tensor([True, False, True]),
    }
    src, dst = tmp_path / "model.safetensors", tmp_path / "pytorch_model.bin"
    save_file(tensors, src)
    expected = load_file(src)
    order = ("ids", "bf16", "odd", "scalar", "empty", "f32", "mask")
    shard_to_bin(src, dst, order)
    got = torch.load(dst, weights_only=True)
    assert list(got) == list(order)
    for name, t in expected.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t), name
        # each tensor is saved as its own bytes, not the whole mapped shard
        assert got[name].untyped_storage().nbytes() == t.numel() * t.element_size(), name
    assert not src.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["pytorch_model.bin"]


def test_a_failed_save_leaves_the_shard_and_no_bin(tmp_path, monkeypatch):
    src, dst = tmp_path / "model.safetensors", tmp_path / "pytorch_model.bin"
    save_file({"w": torch.ones(4)}, src)
    before = src.read_bytes()

    def full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError):
        shard_to_bin(src, dst, ("w",))
    assert src.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
