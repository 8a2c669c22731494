"""Shared pieces of the benchmark: paths, thread settings, request pool, child processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
EMBEDDING_DIM = 1024


def thread_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment every measured process gets: the same OpenMP settings Triton's
    decoder runs under (embcap/triton_server.py), so the comparison is fair. Spinning
    OpenMP workers collapse throughput on 2 shared cores, hence PASSIVE."""
    env = dict(os.environ if base is None else base)
    env.update({
        "OMP_NUM_THREADS": "1",  # torch.set_num_threads(decoder_threads) raises it for the decoder
        "OMP_WAIT_POLICY": "PASSIVE",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    })
    env.setdefault("EMBCAP_CACHE_DIR", str(ROOT / ".cache"))
    return env


THREAD_SETTINGS_NOTE = "OMP_WAIT_POLICY=PASSIVE, OMP_NUM_THREADS=1, torch.set_num_threads(decoder_threads)"


INPUT_KINDS = ("normal", "realistic")


def embedding_pool(requests: int, rows: int, seed: int = 0, kind: str = "normal") -> np.ndarray:
    """[requests, rows, 1024] float32 embeddings; the same pool feeds the gateway, the baseline,
    perf_analyzer and the offline loop.

    "normal": standard-normal rows (norm ~32): the default model writes to its token limit, so
    every caption has the same length. "realistic": like the evaluator's (embcap.inputs: norms
    0.5-1), so captions end at their own lengths.
    """
    if kind == "realistic":
        from embcap.inputs import realistic_embeddings

        return realistic_embeddings(requests * rows, EMBEDDING_DIM, seed).reshape(requests, rows, EMBEDDING_DIM)
    if kind != "normal":
        raise ValueError(f"unknown input kind {kind!r}: one of {INPUT_KINDS}")
    rng = np.random.default_rng(seed)
    return rng.standard_normal((requests, rows, EMBEDDING_DIM)).astype(np.float32)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_status(url: str, timeout_s: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


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
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log_path}:\n"
                                   + tail(self.log_path))
            if http_status(self.base_url + path, timeout_s=2.0) == 200:
                return time.perf_counter() - self.started_at
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not healthy within {timeout_s:.0f} s; see {self.log_path}:\n"
                           + tail(self.log_path))

    def stop(self, timeout_s: float = 40.0) -> int:
        """SIGTERM, then SIGKILL after `timeout_s`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def spawn(name: str, command: list[str], log_path: Path, base_url: str, env: dict[str, str] | None = None) -> Child:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env or thread_env(), stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return Child(name, process, log_path, base_url, started)


def python() -> str:
    return sys.executable
