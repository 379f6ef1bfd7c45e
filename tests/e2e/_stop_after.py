"""Run the `mergeflow` command (argv) until it is stopped from outside, for resume tests.

The first MF_STOP_AFTER tensor writes go through; the next one writes only half its bytes
(a torn write), then it and every later write touch the file MF_STOPPED and block. SIGKILL
ends the process there. SIGINT (Ctrl-C) raises KeyboardInterrupt as usual and lets the
blocked writes finish, as running tasks do when a user interrupts a real merge.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from mergeflow import cli
from mergeflow.exec import tasks


def main() -> int:
    limit, stopped = int(os.environ["MF_STOP_AFTER"]), os.environ["MF_STOPPED"]
    real, lock, count, release = tasks.write_at, threading.Lock(), [0], threading.Event()

    def write_at(path, offset, data):
        with lock:
            count[0] += 1
            n = count[0]
        if n <= limit:
            return real(path, offset, data)
        if n == limit + 1:
            real(path, offset, memoryview(data)[: len(data) // 2])
        with open(stopped, "a"):
            pass
        release.wait()
        return real(path, offset, data)

    def interrupt(signum, frame):
        release.set()
        signal.default_int_handler(signum, frame)

    tasks.write_at = write_at
    signal.signal(signal.SIGINT, interrupt)
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
