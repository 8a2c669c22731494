"""The supervisor cannot die quietly: out of file descriptors its watch goes on and a killed tritonserver
is restarted; if its task ends anyway, health and liveness say why and the process exits non-zero."""

from __future__ import annotations

import argparse
import resource
import socket
import subprocess
import sys
import time
from urllib.parse import urlparse

import httpx
import psutil

from conftest import ROOT, free_port, stop_process, wait_http
from export.options import ExportOptions
from export.repository import export_repository
from runtime.supervisor import WATCHDOG_STALE_S, Supervisor

FD_LIMIT = 256  # server.py and its children; the test opens more connections than that


def limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def test_the_watchdog_survives_fd_exhaustion_and_restarts_a_killed_tritonserver(tiny_checkpoint, tmp_path):
    """Before: psutil raised EMFILE in the watch loop, its task ended unseen, and a tritonserver that died
    afterwards was never restarted (health 503 for good)."""
    port = free_port()
    command = [sys.executable, "server.py", "--checkpoint", str(tiny_checkpoint), "--model-repository",
               str(tmp_path / "repo"), "--bind", "127.0.0.1", "--port", str(port), "--grpc-port", str(free_port())]
    log_path = tmp_path / "server.log"
    process = subprocess.Popen(command, cwd=ROOT, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT,
                               preexec_fn=limit_fds)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/api/v1/health", 180, process, log_path=log_path)
        address = urlparse(base)
        held = []
        for _ in range(FD_LIMIT + 100):  # the kernel queues what the server can no longer accept
            held.append(socket.create_connection((address.hostname, address.port), timeout=5))
        time.sleep(3.0)  # the watch loop runs ~15 rounds without a free descriptor
        for sock in held:
            sock.close()
        time.sleep(1.5)
        log = log_path.read_text()
        assert "watchdog: cannot check" in log, "the descriptors never ran out: the test proves nothing"
        [triton] = [p for p in psutil.Process(process.pid).children() if p.name() == "tritonserver"]
        triton.kill()
        killed = time.monotonic()
        wait_http(base + "/api/v1/health", 60, process, log_path=log_path)
        recovered = time.monotonic() - killed
        assert recovered < 60
        assert httpx.get(base + "/metrics", timeout=5).status_code == 200
        log = log_path.read_text()
        assert log.count("watchdog: cannot check") <= 2, "held back: at most one line per 10 s"
        assert log.count("out of system resource") <= 2, "accept errors: at most one line per 10 s"
        print(f"tritonserver restarted and healthy {recovered:.1f} s after the kill")
    finally:
        assert stop_process(process) == 0


def test_a_supervisor_that_stops_says_why_and_the_process_exits_non_zero(tiny_checkpoint, tmp_path):
    """A repository whose config cannot be parsed ends the supervisor's task (it reads the configs before
    starting Triton): before, that task ended unseen and the server stayed up, 503 "starting" for good."""
    repository = export_repository(tiny_checkpoint, tmp_path / "repo", ExportOptions(decoder_threads=1),
                                   log=lambda _: None)
    (repository / "decoder" / "config.pbtxt").write_text("this is { not a model config")
    port = free_port()
    command = [sys.executable, "server.py", "--checkpoint", str(tiny_checkpoint), "--model-repository",
               str(repository), "--skip-export", "--bind", "127.0.0.1", "--port", str(port), "--grpc-port",
               str(free_port())]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr[-2000:]
    assert "the Triton supervisor stopped" in run.stderr and "exiting" in run.stderr, run.stderr[-2000:]


def test_liveness_reflects_the_watchdog():
    supervisor = Supervisor(argparse.Namespace(), ExportOptions(), on_ready=lambda: None)
    assert supervisor.liveness() is None
    supervisor.watching, supervisor.beat = True, time.monotonic() - WATCHDOG_STALE_S - 1
    assert "has not run for" in supervisor.liveness()
    supervisor.fail("the Triton supervisor stopped: boom")
    assert supervisor.liveness() == supervisor.status() == "the Triton supervisor stopped: boom"
