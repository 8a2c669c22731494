"""Run parts of the stack as local child processes: free ports, waiting for HTTP answers, stopping.

The tests and the benchmarks start the real tritonserver, gateway and server.py with these.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # where `server.py` and `python -m gateway` run from


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_port_range(text: str) -> range:
    """"20000-20099" -> range(20000, 20100); ValueError naming the problem."""
    low, sep, high = text.partition("-")
    try:
        first, last = int(low), int(high if sep else low)
    except ValueError:
        raise ValueError(f"a port range is FIRST-LAST (e.g. 20000-20099), not {text!r}") from None
    if not 1024 <= first <= last <= 65535:
        raise ValueError(f"port range {text!r} must lie within 1024-65535, first <= last")
    return range(first, last + 1)


class PortPool:
    """Ports for the servers one run starts: any free port, or free ports from `ports` only, each handed
    out once in turn (so two servers started together never get the same one)."""

    def __init__(self, ports: range | None = None) -> None:
        self.ports = ports
        self._next = 0

    def take(self) -> int:
        """The next free port; RuntimeError when every port of the range is taken."""
        if self.ports is None:
            return free_port()
        for _ in range(len(self.ports)):
            port = self.ports[self._next % len(self.ports)]
            self._next += 1
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
        raise RuntimeError(f"no free port in {self.ports.start}-{self.ports.stop - 1}")


@dataclass(frozen=True)
class Answer:
    """An HTTP answer: its status and body."""

    status_code: int
    body: bytes

    def json(self):
        return json.loads(self.body)


def http_get(url: str, timeout_s: float = 2.0) -> Answer | None:
    """GET `url`; None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return Answer(response.status, response.read())
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, exc.read())
    except (OSError, ValueError):
        return None


def tail(path: Path, lines: int = 15) -> str:
    """The last `lines` lines of a log file ("" if unreadable)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_http(url: str, timeout_s: float, process: subprocess.Popen | None = None, status: int = 200,
              log_path: Path | None = None) -> Answer:
    """Poll `url` until it answers `status`; fail early, with the log's tail, if `process` dies."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} while waiting for {url}"
                               + (f"; see {log_path}:\n{tail(log_path)}" if log_path else ""))
        answer = http_get(url)
        if answer is not None and answer.status_code == status:
            return answer
        last = answer.status_code if answer is not None else "no answer"
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer {status} within {timeout_s:.0f} s (last: {last})"
                       + (f"; see {log_path}:\n{tail(log_path)}" if log_path else ""))


def stop_process(process: subprocess.Popen, timeout_s: float = 40) -> int:
    """SIGTERM, then SIGKILL after `timeout_s`; returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@dataclass
class Child:
    """A child process we started, its log and the address it serves."""

    name: str
    process: subprocess.Popen
    log_path: Path
    base_url: str
    started_at: float  # time.perf_counter() just before Popen

    def wait_healthy(self, timeout_s: float, path: str = "/api/v1/health") -> float:
        """Block until `path` answers 200; return seconds since the process was started."""
        wait_http(self.base_url + path, timeout_s, self.process, log_path=self.log_path)
        return time.perf_counter() - self.started_at

    def stop(self, timeout_s: float = 40.0) -> int:
        return stop_process(self.process, timeout_s)


def spawn(name: str, command: list[str], log_path: Path, base_url: str, env: dict[str, str] | None = None) -> Child:
    """Start `command` from the repository root, its output appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return Child(name, process, log_path, base_url, started)
