"""server.py as the container runs it: export, Triton supervision, banner, SIGTERM."""

from __future__ import annotations

import http.client
import json
import signal
import time
import urllib.parse

import httpx
import numpy as np
import psutil

from prometheus_client.parser import text_string_to_metric_families

from conftest import launch_server, stop_process, wait_http
from gateway.metrics import IN_FLIGHT
from gateway.settings import GatewaySettings


def rows(count: int, seed: int = 0) -> list[float]:
    return np.random.default_rng(seed).standard_normal(count * 1024).astype(np.float32).tolist()


def tritonserver_of(pid: int) -> psutil.Process:
    children = [p for p in psutil.Process(pid).children() if p.name() == "tritonserver"]
    assert len(children) == 1, children
    return children[0]


def wait_in_flight(base: str, timeout_s: float = 0.8 * GatewaySettings.body_timeout_s) -> None:
    """Until the gateway counts a request in flight (a held body must go on before the gateway's body timeout)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        families = text_string_to_metric_families(httpx.get(base + "/metrics", timeout=5).text)
        if any(sample.value >= 1 for family in families if family.name == IN_FLIGHT for sample in family.samples):
            return
        time.sleep(0.02)
    raise AssertionError(f"no request in flight after {timeout_s:.0f} s")


def test_banner_is_held_until_the_model_is_ready(shared_server):
    _, _, log_path = shared_server
    log = log_path.read_text()
    assert "Uvicorn running on" in log and "Press CTRL+C to quit" in log
    assert log.index("tritonserver ready") < log.index("Uvicorn running on")


def test_sigterm_finishes_in_flight_requests_and_exits_cleanly(tiny_server):
    """A request in flight when SIGTERM comes is answered in full. It is held in flight by its body: the head and
    the first bytes go out, SIGTERM is sent once the gateway counts the request, and only then the rest. (A fixed
    sleep before the signal raced a busy machine both ways: the request not yet sent, or already answered.)"""
    process, base, _ = tiny_server
    triton = tritonserver_of(process.pid)
    body = json.dumps({"embedding": rows(48)}).encode()
    address = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    connection.putrequest("POST", "/api/v1/inference")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(len(body)))
    connection.endheaders(body[:1024])
    wait_in_flight(base)
    process.send_signal(signal.SIGTERM)
    connection.send(body[1024:])
    response = connection.getresponse()
    answer = json.loads(response.read())
    assert response.status == 200 and len(answer["texts"]) == 48, answer
    assert process.wait(60) == 0
    assert not triton.is_running() or triton.status() == psutil.STATUS_ZOMBIE


def test_a_killed_tritonserver_is_detected_and_restarted(shared_server):
    process, base, _ = shared_server
    tritonserver_of(process.pid).kill()
    started = time.monotonic()
    wait_http(base + "/api/v1/health", 5, process, status=503)
    detected = time.monotonic() - started
    body = wait_http(base + "/api/v1/health", 120, process).json()
    assert detected < 2.5
    assert body["status"] == "healthy"
    response = httpx.post(base + "/api/v1/v2t", json={"embedding": rows(4)}, timeout=60)
    assert response.status_code == 200 and len(response.json()["texts"]) == 4


def test_an_invalid_checkpoint_is_reported_by_health(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "caption_model.json").write_text('{"decoder": {"path": "nowhere"}}')
    process, base = launch_server(broken, tmp_path)
    try:
        deadline, error = time.monotonic() + 60, None
        while time.monotonic() < deadline and not (error or "").startswith("export failed"):
            time.sleep(0.3)
            try:
                response = httpx.get(base + "/api/v1/health", timeout=2)
            except httpx.HTTPError:
                continue
            assert response.status_code == 503
            assert response.json()["status"] == "initializing"
            error = response.json()["initialization_status"]["error"]
        assert error.startswith("export failed") and "projector weights" in error
        assert "export failed: export failed" not in error and error.count("export failed") == 1, error
    finally:
        assert stop_process(process) == 0
