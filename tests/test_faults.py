"""Faults inside the stack: dead stubs and Triton under load, timeouts; metrics and request ids."""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import psutil
from prometheus_client.parser import text_string_to_metric_families

from embcap.inputs import realistic_embeddings

from conftest import start_gateway, stop_process, wait_http

URL = "/api/v1/inference"


def payload(rows: int, seed: int = 0, realistic: bool = False) -> dict:
    if realistic:
        return {"embedding": realistic_embeddings(rows, seed=seed).reshape(-1).tolist()}
    return {"embedding": np.random.default_rng(seed).standard_normal(rows * 1024).astype(np.float32).tolist()}


def triton_children(server_pid: int, name: str) -> list[psutil.Process]:
    triton = [p for p in psutil.Process(server_pid).children() if p.name() == "tritonserver"]
    assert len(triton) == 1
    return triton if name == "tritonserver" else [p for p in triton[0].children() if p.name() == name]


def decoder_stub(server_pid: int) -> psutil.Process:
    stubs = triton_children(server_pid, "triton_python_backend_stub")
    return next(p for p in stubs if "/decoder/" in p.cmdline()[1])


class LoadLoop:
    """Sends requests (4 rows, realistic and standard-normal in turn) from a few threads until stopped;
    records status and duration of each, and every 200 whose captions are not one non-blank string per row."""

    def __init__(self, base: str, workers: int = 4) -> None:
        self.base = base
        self.results: list[tuple[int, float]] = []
        self.wrong_answers: list[str] = []  # a wrong count zeroes the evaluator's whole run
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(workers)]

    def _run(self, seed: int) -> None:
        with httpx.Client(timeout=70) as client:
            deadline = time.monotonic() + 180  # bounded even if stop() is never called
            sent = 0
            while not self._stop.is_set() and time.monotonic() < deadline:
                started = time.monotonic()
                sent += 1
                try:
                    response = client.post(self.base + URL, json=payload(4, seed, realistic=sent % 2 == 0))
                    status = response.status_code
                    if status == 200:
                        texts = response.json()["texts"]
                        if len(texts) != 4 or not all(isinstance(t, str) and t.strip() for t in texts):
                            self.wrong_answers.append(repr(texts)[:200])
                except httpx.HTTPError:
                    status = -1
                self.results.append((status, time.monotonic() - started))

    def __enter__(self) -> "LoadLoop":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(90)


def assert_recovers(base: str, process, kill) -> dict:
    """Kill something under load; health must turn 503 fast and come back; requests never hang."""
    with LoadLoop(base) as load:
        time.sleep(1.0)
        kill()
        killed = time.monotonic()
        wait_http(base + "/api/v1/health", 10, process, status=503)
        detected = time.monotonic() - killed
        wait_http(base + "/api/v1/health", 120, process)
        recovered = time.monotonic() - killed
        time.sleep(1.0)
    statuses = {status for status, _ in load.results}
    assert statuses <= {200, 502, 503}, statuses
    assert not load.wrong_answers, f"answered 200 with a wrong caption count or a blank caption: {load.wrong_answers}"
    assert max(duration for _, duration in load.results) < 20, "a request hung during the fault"
    assert load.results[-1][0] == 200
    assert detected < 2.0
    return {"detected_s": detected, "recovered_s": recovered}


def test_killed_decoder_stub_is_detected_and_recovered(shared_server):
    process, base, log_path = shared_server
    logged_before = log_path.stat().st_size  # the module's tests share the server and its log
    timings = assert_recovers(base, process, lambda: decoder_stub(process.pid).kill())
    assert "stub of model 'decoder' died" in log_path.read_bytes()[logged_before:].decode(errors="replace")
    print(f"stub kill: {timings}")


def test_killed_tritonserver_under_load_is_restarted(shared_server):
    process, base, _ = shared_server
    timings = assert_recovers(base, process, lambda: triton_children(process.pid, "tritonserver")[0].kill())
    print(f"tritonserver kill: {timings}")


def test_triton_request_timeout_is_enforced(tiny_triton, tmp_path):
    gateway, base = start_gateway(tiny_triton.url, tmp_path / "gateway.log",
                                  env={"EMBCAP_REQUEST_TIMEOUT_S": "0.001"})
    try:
        response = httpx.post(base + URL, json=payload(4), timeout=30)
        assert response.status_code == 504 and response.json()["error"] == "triton_timeout"
    finally:
        stop_process(gateway)


def counters(base: str) -> dict[tuple[str, tuple], float]:
    """The gateway's /metrics samples: (name, sorted labels) -> value."""
    text = httpx.get(base + "/metrics", timeout=10).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_and_request_ids(shared_server):
    process, base, log_path = shared_server
    before = counters(base)  # the module's tests share the server: what they sent is counted already
    ok = httpx.post(base + URL, json=payload(2), headers={"X-Request-ID": "req-ok-1"}, timeout=30)
    bad = httpx.post(base + "/api/v1/v2t", json={"embedding": [1.0]}, headers={"X-Request-ID": "req-bad-1"})
    assert ok.headers["x-request-id"] == "req-ok-1" and bad.status_code == 422

    text = httpx.get(base + "/metrics", timeout=10).text
    after = counters(base)
    inference_ok = ("embcap_requests_total", (("route", "/api/v1/inference"), ("status", "200")))
    v2t_refused = ("embcap_requests_total", (("route", "/api/v1/v2t"), ("status", "422")))
    rows_sum = ("embcap_rows_per_request_sum", ())
    assert {key: after[key] - before.get(key, 0.0) for key in (inference_ok, v2t_refused, rows_sum)} == \
        {inference_ok: 1.0, v2t_refused: 1.0, rows_sum: 2.0}
    assert "embcap_request_seconds_bucket" in text
    assert 'nv_inference_request_success{model="captioner"' in text  # Triton's own metrics, appended

    # Triton's metrics are scraped over one kept connection: no closed ones pile up in TIME_WAIT
    metrics_port = int(process.args[process.args.index("--metrics-port") + 1])
    for _ in range(5):
        assert httpx.get(base + "/metrics", timeout=10).status_code == 200
    to_triton = [c for c in psutil.net_connections(kind="tcp") if c.raddr and c.raddr.port == metrics_port]
    assert not [c for c in to_triton if c.status == psutil.CONN_TIME_WAIT], to_triton
    assert len([c for c in to_triton if c.status == psutil.CONN_ESTABLISHED]) == 1, to_triton

    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    served = [e for e in lines if e.get("request_id") == "req-ok-1"]
    failed = [e for e in lines if e.get("request_id") == "req-bad-1"]
    assert served and served[0]["rows"] == 2
    assert failed and failed[0]["status"] == 422 and "not a multiple of 1024" in failed[0]["msg"]
