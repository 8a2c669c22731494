"""Which of the Python backend's temp folders (/tmp/python_env_XXXXXX) belongs to which tritonserver.

The backend makes its folder in /tmp (whatever TMPDIR says) when it initialises, removes it when tritonserver
exits cleanly, and aborts at that exit ("fts_read error") if the folder is gone by then. Nothing names the server
a folder belongs to: only when it appeared. So a start holds a host-wide lock from just before tritonserver is
launched until its folder appears; the one new folder is then this server's, and servers started on one host at
the same moment never take (and later delete) each other's.
"""

from __future__ import annotations

import fcntl
import glob
import os
import time
from pathlib import Path
from typing import Callable

PYTHON_ENV_GLOB = "/tmp/python_env_*"  # the backend's own temp folders (hard-coded /tmp)
LOCK_PATH = Path("/tmp/embcap-python-env.lock")  # beside them: every server on the host sees the same one
APPEAR_TIMEOUT_S = 60.0  # past this the lock is let go: the folder, if it comes later, stays unclaimed


def python_env_dirs() -> set[str]:
    """The Python backend's temp folders that exist now."""
    return set(glob.glob(PYTHON_ENV_GLOB))


class PythonEnvClaim:
    """The host-wide claim: acquire() (or `with`), launch tritonserver on the thread that owns it, wait(alive) for
    its folder, release()."""

    def __init__(self, lock_path: Path = LOCK_PATH) -> None:
        self.lock_path = lock_path
        self._fd: int | None = None
        self._before: set[str] = set()

    def acquire(self) -> "PythonEnvClaim":
        """Wait for the lock (another server's start holds it about a second), then note the folders there."""
        try:  # read-only is enough for flock, so a file another user created serves as well
            self._fd = os.open(self.lock_path, os.O_RDONLY | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except OSError:  # no lock to be had (a read-only /tmp): folders are told apart by time alone
            self.release()
        self._before = python_env_dirs()
        return self

    def wait(self, alive: Callable[[], bool], timeout_s: float = APPEAR_TIMEOUT_S) -> set[str]:
        """The folders that appeared since acquire(), once there is one (or the server died, or `timeout_s`
        passed: then whatever appeared, possibly none)."""
        deadline = time.monotonic() + timeout_s
        while True:
            new = python_env_dirs() - self._before
            if new or not alive() or time.monotonic() >= deadline:
                return new
            time.sleep(0.02)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            self._fd = None

    def __enter__(self) -> "PythonEnvClaim":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
