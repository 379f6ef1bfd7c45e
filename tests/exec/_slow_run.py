"""Run the `mergeflow` command (argv) with every merge task slowed by MF_SLOW seconds, so
that a test can watch the progress bar and the dashboard while the merge runs."""

from __future__ import annotations

import os
import sys
import time

from mergeflow import cli
from mergeflow.exec import tasks


def main() -> int:
    delay = float(os.environ.get("MF_SLOW", "0.2"))
    for name in ("run_tensor", "apply_block"):
        real = getattr(tasks, name)

        def slow(*args, _real=real, **kwargs):
            time.sleep(delay)
            return _real(*args, **kwargs)
        setattr(tasks, name, slow)
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
