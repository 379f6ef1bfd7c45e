"""The memory budget, measured: merges (linear, and ties with its two selection passes) whose
largest tensor is larger than --memory-limit stay under it (the child's peak resident memory
from the kernel, not a timer); and the budget's choices (resident or re-read, row blocks).

--memory-limit bounds anonymous memory (exec/budget.py); mapped files (libraries) are page
cache. The merge here computes in float32 from bfloat16 inputs, so every
input is an anonymous copy, and the peak RSS less the libraries mapped at the end (RssFile
once the merge is done) is the peak of what the budget governs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mergeflow.exec import budget as memory
from mergeflow.exec.graph import jobs
from mergeflow.plan import plan_merge
from mergeflow.spec.config import load_config
from mergeflow.testing import make_family

LIMIT = 450_000_000  # --memory-limit 450MB: 200 MB left beside the process (memory.BASELINE)
ROWS = 1_250_000  # x 64 columns x bf16 = a 160 MB embedding per model, 320 MB in float32
EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory) -> dict[str, Path]:
    """A one-layer model with a 160 MB (tied) embedding and a fine-tune of it."""
    return make_family(tmp_path_factory.mktemp("bigvocab"), finetunes=["ft"], hidden=64, layers=1,
                       intermediate=128, tie_word_embeddings=True, extra_vocab_rows=ROWS - 384)


def config(models: dict[str, Path], path: Path) -> Path:
    path.write_text(f"""merge_method: linear
models:
  - model: {models['base']}
    parameters: {{weight: 0.5}}
  - model: {models['ft']}
    parameters: {{weight: 0.5}}
dtype: float32
""")
    return path


def ties_config(models: dict[str, Path], path: Path) -> Path:
    path.write_text(f"""merge_method: ties
base_model: {models['base']}
models:
  - model: {models['ft']}
    parameters: {{weight: 0.5, density: 0.5}}
dtype: float32
""")
    return path


# `mergeflow` in a child that reports its own peak resident memory (VmHWM, the kernel's
# high-water mark) and the file pages it still maps at the end (RssFile: its libraries).
# Not ru_maxrss from wait4: after a vfork-exec that also holds the parent's (pytest's) peak.
CHILD = """import sys
from mergeflow.cli import main
code = main(sys.argv[1:])
status = dict(x.split(":", 1) for x in open("/proc/self/status"))
print(status["VmHWM"].split()[0], status["RssFile"].split()[0], file=sys.stderr)
sys.exit(code)
"""


def peak_memory(args: list[str]) -> int:
    """Run `mergeflow ARGS` in a child: its peak RSS less its mapped libraries, in bytes."""
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    hwm, libraries = proc.stderr.split()[-2:]
    return (int(hwm) - int(libraries)) * 1024


@pytest.mark.slow
def test_merge_of_a_tensor_larger_than_the_limit_stays_under_it(big_vocab, tmp_path):
    cfg = config(big_vocab, tmp_path / "merge.yml")
    plan = plan_merge(load_config(cfg))
    embed = next(t for t in plan.tensors if t.name == EMBED)
    # the tensor alone is larger than what the limit leaves, and merged whole it would need
    # several times the limit (two float32 copies of the inputs, a float32 accumulator and
    # three float32 temporaries: 24 bytes per element): the test can only pass in row chunks
    assert embed.nbytes > LIMIT - memory.BASELINE
    assert 24 * ROWS * 64 > 2 * LIMIT
    peak = peak_memory(["run", str(cfg), str(tmp_path / "out"), "--memory-limit", str(LIMIT), "--quiet"])
    assert peak < LIMIT, f"peak {peak / 1e6:.0f} MB over the {LIMIT / 1e6:.0f} MB limit"
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as out, \
            safe_open(big_vocab["base"] / "model.safetensors", "pt") as b, \
            safe_open(big_vocab["ft"] / "model.safetensors", "pt") as f:
        rows = slice(ROWS - 1000, ROWS)  # the last block's rows; exact: x * 0.5 is exact
        expected = b.get_slice(EMBED)[rows].float() * 0.5 + f.get_slice(EMBED)[rows].float() * 0.5
        assert torch.equal(out.get_slice(EMBED)[rows], expected)


@pytest.mark.slow
def test_ties_of_a_tensor_larger_than_the_limit_stays_under_it(big_vocab, tmp_path):
    # two reduction passes per tensor (the top-k selection, exact: float32 needs both radix
    # passes) re-read the 160 MB inputs: nothing tensor-sized is ever held
    cfg = ties_config(big_vocab, tmp_path / "merge.yml")
    budget = memory.budget_for(LIMIT)
    embed = next(j for j in jobs(plan_merge(load_config(cfg)), tmp_path, budget=budget) if j.name == EMBED)
    assert not embed.resident and len(embed.program().passes) == 2 and embed.blocks
    peak = peak_memory(["run", str(cfg), str(tmp_path / "out"), "--memory-limit", str(LIMIT), "--quiet"])
    assert peak < LIMIT, f"peak {peak / 1e6:.0f} MB over the {LIMIT / 1e6:.0f} MB limit"


def test_budget_keeps_inputs_only_when_they_fit(family, tmp_path):
    # ties: every tensor has passes; with room for them all each is read once and kept,
    # under a tight limit none is, and the estimate follows the chunks
    cfg = ties_config({"base": family["base"], "ft": family["a"]}, tmp_path / "merge.yml")
    plan = plan_merge(load_config(cfg))
    roomy = jobs(plan, tmp_path, budget=memory.budget_for("4GB"))
    assert all(j.resident for j in roomy) and not any(j.blocks for j in roomy)
    tight = memory.Budget(memory.BASELINE + 3 * memory.MIN_TASK, 2)  # 8 MB a task
    small = jobs(plan, tmp_path, budget=tight)
    stored = {j.name: sum(s.nbytes for s in j.sources) for j in small}
    assert all(j.resident == (memory.working_set(j) <= tight.per_task) for j in small)
    assert all(memory.working_set(j) <= tight.per_task for j in small)
    estimate = memory.estimate(small, tight)
    assert estimate.peak <= tight.memory_limit and not estimate.warnings()
    assert max(stored.values()) < tight.per_task  # the tiny family fits even so: all resident
