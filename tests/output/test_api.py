"""The Python API: its names, importable from `mergeflow` without torch or dask, and typed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mergeflow


def test_the_api_is_importable_from_the_package_without_loading_torch():
    code = ("import sys, mergeflow; assert 'torch' not in sys.modules and 'dask' not in sys.modules; "
            "from mergeflow import MergeflowError, RunOptions; "
            "assert RunOptions(memory_limit='1GB').memory_limit == 10**9; print(MergeflowError.__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(mergeflow.__file__).parents[1])
    assert done.returncode == 0 and done.stdout == "MergeflowError\n", done.stderr


def test_the_package_is_typed_and_its_functions_documented():
    assert (Path(mergeflow.__file__).parent / "py.typed").is_file()
    for name in ("plan_merge", "build_graph", "run_merge"):
        doc = getattr(mergeflow, name).__doc__ or ""
        assert len(doc.split()) >= 20, name  # says what goes in and what comes out
