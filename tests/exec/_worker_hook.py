"""`dask worker --preload` for the cluster tests: one worker dies in the middle of a write.

When the file named by MF_KILL_ARM exists, the first worker whose task writes claims it
(unlinks it: exactly one wins), writes half of its bytes, notes its pid in MF_KILL_ARM +
".killed", and kills itself with SIGKILL: a worker lost mid-merge with a torn write behind.
"""

from __future__ import annotations

import os
import signal

from mergeflow.exec import tasks

# dask may import (reload) a preload file more than once in a process: wrap the original once
_real_write_at = getattr(tasks.write_at, "unhooked", tasks.write_at)


def _write_at(path, offset, data):
    arm = os.environ.get("MF_KILL_ARM")
    try:
        if not arm:
            raise FileNotFoundError
        os.unlink(arm)
    except FileNotFoundError:
        return _real_write_at(path, offset, data)
    _real_write_at(path, offset, memoryview(data)[: len(data) // 2])
    with open(arm + ".killed", "w") as f:
        f.write(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)


_write_at.unhooked = _real_write_at
tasks.write_at = _write_at
