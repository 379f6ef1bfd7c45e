"""Random damage to a shard: the run merges the undamaged model's bytes or exits 2, never 1,
never hangs.

A property test (hypothesis): bytes flipped anywhere in a shard's header (its length prefix
included), the shard truncated, or bytes appended to it. Each example runs `mergeflow run`
in-process on a fresh copy of the damaged model under an alarm, so a hang fails the example.
"""

from __future__ import annotations

import shutil
import signal
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mergeflow.cli import main
from mergeflow.testing import make_model

SMALL = {"hidden": 32, "layers": 2, "intermediate": 64, "heads": 2, "kv_heads": 1}
SHARD = "model-00001-of-00002.safetensors"
SECONDS = 20  # per example: a merge of these models takes well under a second


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("damage")
    base = make_model(root / "base", seed=0, **SMALL)
    tune = make_model(root / "tune", seed=1, base=base, shards=2)
    config = root / "merge.yml"
    config.write_text(f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.5}}\n"
                      f"  - model: {root / 'copy'}\n    parameters: {{weight: 0.5}}\n")
    shutil.copytree(tune, root / "copy")
    assert _run(config, root / "expected") == 0
    raw = (tune / SHARD).read_bytes()
    return {"root": root, "tune": tune, "config": config, "raw": raw,
            "header": 8 + struct.unpack("<Q", raw[:8])[0],
            "expected": (root / "expected" / "model.safetensors").read_bytes()}


def _run(config: Path, out: Path) -> int:
    def hang(*_):
        raise TimeoutError(f"the run took over {SECONDS} s")
    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(SECONDS)
    try:
        return main(["run", str(config), str(out), "--scheduler", "sync", "--quiet", "--force"])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


FRACTION = st.floats(0, 1, exclude_max=True)  # where in the file to cut, as a fraction of it
WHERE = st.integers(0, 2**20)  # a header position, modulo the header's length: spread over all of it
damage = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(WHERE, st.integers(1, 255)), min_size=1, max_size=3)),
    st.tuples(st.just("truncate"), FRACTION),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
)


def _damaged(pair: dict, kind: str, arg) -> bytes:
    raw = bytearray(pair["raw"])
    if kind == "flip":
        for at, mask in arg:
            raw[at % pair["header"]] ^= mask
    elif kind == "truncate":
        del raw[int(arg * len(raw)):]
    elif kind == "retext":  # (old, new) of one length, inside the header
        at = raw.index(arg[0], 8, pair["header"])
        raw[at:at + len(arg[0])] = arg[1]
    else:
        raw += arg
    return bytes(raw)


@settings(max_examples=150, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(damage)
@example(("truncate", 0.0)).via("an empty shard")
@example(("append", b"\0")).via("one byte appended")
@example(("flip", [(0, 1)])).via("the header length, one less")
@example(("flip", [(-1, 2)])).via("the header's last byte (padding)")
@example(("retext", (b"[24576,", b"[24578,"))).via("the second tensor moved by two bytes")
@example(("retext", (b'"pt"', b'"pu"'))).via("a metadata value: still the same model")
@example(("retext", (b"}    ", b"}\t   "))).via("padding space to tab: still the same model")
def test_random_damage_to_a_shard_merges_the_same_model_or_exits_2(pair, capsys, case):
    kind, arg = case
    with tempfile.TemporaryDirectory(dir=pair["root"]) as tmp:
        work = Path(tmp)
        shutil.copytree(pair["tune"], work / "copy")
        (work / "copy" / SHARD).write_bytes(_damaged(pair, kind, arg))
        config = work / "merge.yml"
        config.write_text(pair["config"].read_text().replace(str(pair["root"] / "copy"), str(work / "copy")))
        rc = _run(config, work / "out")
        err = capsys.readouterr().err
        assert rc in (0, 2), err
        if rc == 0:
            assert (work / "out" / "model.safetensors").read_bytes() == pair["expected"]
        else:
            assert err.startswith("error: ") and "Traceback" not in err and not (work / "out" / "config.json").exists()
