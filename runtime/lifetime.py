"""Every process of a server ends when the process that owns it dies, whatever the signal (SIGKILL included).

- tritonserver (and the GPU probe and the export) get a parent-death signal from server.py: Linux sends
  SIGKILL to a child when the thread that forked it exits (`prctl(PR_SET_PDEATHSIG)`); server.py forks
  them from its main thread.
- The Python-backend stubs cannot rely on that: tritonserver forks each stub from a thread that only
  lives while the model instance loads (the backend loads instances in parallel), so a stub that asked
  for the signal was killed as soon as its model had loaded. Nor do they reliably end by themselves: a
  stub checks its parent every 300 ms and exits, but a Triton custom-metric update in flight when the
  parent dies (the decoder pushes its engine metrics every second) waits for the parent's reply without
  a timeout while holding the stub's stub-to-parent mutex and the GIL; the stub's exit path then blocks
  on that mutex for ever, and the stub ignores SIGTERM. So each tritonserver gets a reaper: a small
  process of its own that waits for tritonserver to end (a pidfd: no polling) and then SIGKILLs
  tritonserver's process group, which holds its stubs.
- A server killed together with its reaper leaves processes that the next start on its repository ends
  (`end_processes`, called by the sweep in runtime.instance): they name the instance's shared-memory prefix.

`python -m runtime.lifetime GROUP PIDFD` is the reaper (started by `start_reaper`).
"""

from __future__ import annotations

import ctypes
import functools
import os
import select
import signal
import subprocess
import sys
import time
from typing import Callable

import psutil

from runtime.local import ROOT  # where `python -m runtime.lifetime` is found

TRITON_PROCESS = "tritonserver"  # the process names a server's processes run under
STUB_PROCESS = "triton_python_backend_stub"
PR_SET_PDEATHSIG = 1
POLL_S = 0.5  # the reaper's check where pidfds are missing (Linux before 5.3)


def die_with_parent(parent_pid: int | None = None) -> None:
    """Ask for SIGKILL when the parent (the thread that forked us) dies; die at once if the parent is gone
    already (it is not `parent_pid`, when given: the parent died before the request was made)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)


def dies_with_this_process() -> Callable[[], None]:
    """A `preexec_fn` for a child of this process, forked from the main thread: the child gets SIGKILL when
    this process dies, and dies at once if this process died between the fork and the request."""
    return functools.partial(die_with_parent, os.getpid())


def start_reaper(process: subprocess.Popen) -> subprocess.Popen:
    """Start the reaper of `process`, a process-group leader (started with start_new_session): when it ends,
    however it ends, its group is killed. The reaper is in a session of its own and has no parent-death
    signal: it outlives this process to do its job, and ends right after."""
    try:
        pidfd = os.pidfd_open(process.pid)  # our child, not reaped yet: this is that process, not a reused pid
    except (AttributeError, OSError):
        pidfd = None
    command = [sys.executable, "-m", "runtime.lifetime", str(process.pid), str(-1 if pidfd is None else pidfd)]
    try:
        return subprocess.Popen(command, pass_fds=() if pidfd is None else (pidfd,), start_new_session=True,
                                stdin=subprocess.DEVNULL, cwd=ROOT)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _wait_for_exit(pid: int, pidfd: int) -> None:
    if pidfd >= 0:
        select.select([pidfd], [], [])  # readable once the process has exited
        return
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(POLL_S)


def instance_processes(prefix: str) -> list[psutil.Process]:
    """This user's tritonserver and stub processes that name the shared-memory prefix `prefix` (tritonserver
    in its --backend-config, a stub in its region name): one server instance's, whoever started them."""
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        try:
            if process.info["name"] in (TRITON_PROCESS, STUB_PROCESS) and process.status() != psutil.STATUS_ZOMBIE \
                    and any(prefix in arg for arg in process.info["cmdline"] or ()):
                found.append(process)
        except psutil.Error:
            continue
    return found


def end_processes(prefix: str, timeout_s: float = 5.0) -> list[str]:
    """SIGKILL (stubs ignore SIGTERM) the processes of the instance with shared-memory prefix `prefix`,
    stubs first; wait up to `timeout_s` for them to go. Returns 'pid N (name)' for each one ended, and
    'pid N (name) still running' for any that would not go."""
    processes = sorted(instance_processes(prefix), key=lambda p: p.info["name"] != STUB_PROCESS)
    ended = []
    for process in processes:
        try:
            process.kill()
            ended.append(process)
        except psutil.Error:  # gone already, or not ours to end
            continue
    deadline = time.monotonic() + timeout_s
    while any(map(_running, ended)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [f"pid {p.pid} ({p.info['name']})" + (" still running" if _running(p) else "") for p in ended]


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def main(argv: list[str]) -> int:
    group, pidfd = int(argv[0]), int(argv[1])
    _wait_for_exit(group, pidfd)
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:  # the group ended with its leader: nothing left to end
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
