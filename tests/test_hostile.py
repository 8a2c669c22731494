"""Hostile clients against the live gateway: connection hygiene, bounded echo, strict JSON, parsing off
the event loop, the memory cap, admission control; and Triton's restricted API groups."""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import start_gateway, stop_process
from gateway.logs import MAX_LINE_BYTES
from runtime.triton import RESTRICTED_HEADER, shm_regions

URL = "/api/v1/inference"
HEAD_TIMEOUT_S = 1.0
MAX_HEADERS = 50
BUFFERED_BYTES = 3_000_000
GUARDED = {"EMBCAP_HEADER_TIMEOUT_S": str(HEAD_TIMEOUT_S), "EMBCAP_KEEP_ALIVE_S": "1", "EMBCAP_MAX_HEADERS":
           str(MAX_HEADERS), "EMBCAP_LIMIT_CONCURRENCY": "40", "EMBCAP_MAX_BUFFERED_BYTES": str(BUFFERED_BYTES),
           "EMBCAP_BODY_TIMEOUT_S": "3"}


@pytest.fixture(scope="module")
def guarded(tiny_triton, tmp_path_factory):
    """A gateway with short connection limits (seconds, not the defaults' ten); yields (base url, log path)."""
    log_path = tmp_path_factory.mktemp("guarded") / "gateway.log"
    process, base = start_gateway(tiny_triton.url, log_path, env=GUARDED)
    yield base, log_path
    stop_process(process)


def connect(base: str, timeout_s: float = 10.0) -> socket.socket:
    address = urlparse(base)
    return socket.create_connection((address.hostname, address.port), timeout=timeout_s)


def closed_after(sock: socket.socket, send=lambda sock: None, limit_s: float = 10.0) -> float:
    """Seconds until the server closes `sock` (reading whatever it answers); `send` runs meanwhile."""
    started = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - started < limit_s:
        try:
            send(sock)
            if sock.recv(65536) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - started
    return float("inf")


def reply_of(sock: socket.socket, timeout_s: float = 10.0) -> bytes:
    sock.settimeout(timeout_s)
    reply = b""
    try:
        while chunk := sock.recv(65536):
            reply += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return reply


def healthy(base: str) -> bool:
    return httpx.get(base + "/api/v1/health", timeout=5).status_code == 200


def log_lines(path) -> list[bytes]:
    return path.read_bytes().splitlines()


def test_idle_and_trickling_connections_are_closed(guarded):
    base, _ = guarded
    idle, trickle = connect(base), connect(base)
    assert closed_after(idle) < HEAD_TIMEOUT_S + 2
    head = iter(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 100)
    assert closed_after(trickle, lambda sock: sock.send(bytes([next(head)]))) < HEAD_TIMEOUT_S + 2
    with connect(base) as kept:  # a served keep-alive connection, then idle: the keep-alive timeout
        kept.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert closed_after(kept) < 1 + 2
    assert healthy(base)


def test_oversized_and_too_many_headers_and_long_urls_are_refused(guarded):
    base, _ = guarded
    with connect(base) as sock:  # an endless header: refused after the cap, not read to its end
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent = 0
        try:
            while sent < 8 * 1024 * 1024:
                sock.sendall(b"a" * 65536)
                sent += 65536
        except (ConnectionResetError, BrokenPipeError):
            pass
        assert sent < 8 * 1024 * 1024, "the endless header was read to its end"
    with connect(base) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(MAX_HEADERS + 1))
                     + b"\r\n")
        reply = reply_of(sock)
        assert reply.startswith(b"HTTP/1.1 431") and b"head_too_large" in reply, reply[:300]
    with connect(base) as sock:
        sock.sendall(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply_of(sock).startswith(b"HTTP/1.1 414")
    assert healthy(base)


def test_connections_beyond_the_limit_are_answered_503(guarded):
    base, _ = guarded
    held = [connect(base) for _ in range(40)]
    try:
        time.sleep(0.2)
        answer = httpx.get(base + "/api/v1/health", timeout=5)
        assert answer.status_code == 503  # uvicorn's own answer beyond limit_concurrency
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    assert healthy(base)


def test_echo_is_bounded_and_every_log_line_is_short(guarded):
    base, log_path = guarded
    long_id = "r" * 2000
    answer = httpx.post(base + URL, json={"embedding": [0.5] * 1024}, headers={"X-Request-ID": long_id}, timeout=60)
    assert answer.status_code == 200 and answer.headers["x-request-id"] != long_id
    assert len(answer.headers["x-request-id"]) <= 128
    odd = httpx.post(base + URL, json={"embedding": [0.5] * 1024}, headers={"X-Request-ID": "a b<script>"},
                     timeout=60)
    assert odd.headers["x-request-id"] != "a b<script>"
    fields = {f"field{i}": 1 for i in range(200_000)} | {"embedding": [0.5] * 1024}
    answer = httpx.post(base + URL, content=json.dumps(fields), headers={"content-type": "application/json"},
                        timeout=60)
    assert answer.status_code == 422 and len(answer.content) < 1000 and "and 199995 more" in answer.json()["detail"]
    huge_name = json.dumps({"x" * (2 * 1024 * 1024): 1, "embedding": [0.5]})
    answer = httpx.post(base + URL, content=huge_name, headers={"content-type": "application/json"}, timeout=60)
    assert answer.status_code == 422 and len(answer.content) < 1000
    time.sleep(0.3)
    assert max(len(line) for line in log_lines(log_path)) <= MAX_LINE_BYTES
    assert healthy(base)


def test_repeated_connection_errors_are_logged_once_per_interval(guarded):
    base, log_path = guarded
    before = sum(b"Invalid HTTP request" in line for line in log_lines(log_path))
    for _ in range(50):
        with connect(base) as sock:
            sock.sendall(b"\x00\x01garbage\r\n\r\n")
            reply_of(sock, 2)
    time.sleep(0.3)
    after = sum(b"Invalid HTTP request" in line for line in log_lines(log_path))
    assert after - before <= 2, f"{after - before} lines for 50 bad connections"


def nan_body(megabytes: float) -> bytes:
    count = int(megabytes * 1024 * 1024 / 11)
    return b'{"embedding": [' + b"0.1234567, " * count + b"NaN]}"


@pytest.mark.serial  # health's latency while bodies are parsed: a busy neighbour's processes would eat the margin
def test_bad_bodies_are_parsed_once_and_off_the_event_loop(tiny_gateway):
    """Before: a body orjson refused was parsed again by the standard library, in the event loop:
    a few large ones held health for seconds."""
    body = nan_body(14.6)
    latencies: list[float] = []
    statuses: list[int] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                started = time.perf_counter()
                client.get(tiny_gateway + "/api/v1/health")
                latencies.append(time.perf_counter() - started)
                time.sleep(0.05)

    def send() -> None:
        answer = httpx.post(tiny_gateway + URL, content=body, headers={"content-type": "application/json"},
                            timeout=120)
        statuses.append(answer.status_code)

    poller = threading.Thread(target=poll)
    poller.start()
    senders = [threading.Thread(target=send) for _ in range(6)]
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join(120)
    stop.set()
    poller.join(10)
    assert statuses == [422] * 6
    assert max(latencies) < 2.0, f"health took up to {max(latencies):.2f} s (p50 {statistics.median(latencies):.3f})"


def test_bodies_held_in_memory_are_capped(guarded):
    base, _ = guarded
    size = int(BUFFERED_BYTES * 0.8)
    with connect(base) as slow:  # holds most of the budget while its body trickles in
        slow.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                     % (URL.encode(), size) + b'{"embedding": [')
        time.sleep(0.2)
        started = time.monotonic()
        answer = httpx.post(base + URL, content=b'{"embedding": [' + b"0.5, " * (size // 5) + b"0.5]}",
                            headers={"content-type": "application/json"}, timeout=30)
        assert answer.status_code == 503 and answer.json()["error"] == "busy", answer.text[:300]
        assert answer.headers["retry-after"] and time.monotonic() - started < 2.5  # EMBCAP_BUFFER_WAIT_S: 1 s
    time.sleep(3.5)  # the slow upload's body timeout frees its share
    assert healthy(base)


STRICT = [
    ("duplicate key", b'{"embedding": [1.0], "embedding": ' + json.dumps([0.5] * 1024).encode() + b"}",
     {"content-type": "application/json"}, 422, "more than once"),
    ("escaped duplicate key", b'{"embedding": [1.0], "\\u0065mbedding": ' + json.dumps([0.5] * 1024).encode()
     + b"}", {"content-type": "application/json"}, 422, "more than once"),
    ("UTF-16", json.dumps({"embedding": [0.5] * 1024}).encode("utf-16"), {"content-type": "application/json"}, 400,
     "UTF-8"),
    ("UTF-32", json.dumps({"embedding": [0.5] * 1024}).encode("utf-32"), {"content-type": "application/json"}, 400,
     "UTF-8"),
    ("BOM", b"\xef\xbb\xbf" + json.dumps({"embedding": [0.5] * 1024}).encode(), {"content-type": "application/json"},
     400, "byte order mark"),
    ("gzip", b"\x1f\x8b\x08\x00", {"content-type": "application/json", "content-encoding": "gzip"}, 415,
     "content encoding 'gzip'"),
    ("latin-1 charset", json.dumps({"embedding": [0.5] * 1024}).encode(),
     {"content-type": "application/json; charset=latin-1"}, 415, "charset 'latin-1'"),
]


@pytest.mark.parametrize(("case", "body", "headers", "status", "fragment"), STRICT, ids=[c[0] for c in STRICT])
def test_strict_json(tiny_gateway, case, body, headers, status, fragment):
    answer = httpx.post(tiny_gateway + URL, content=body, headers=headers, timeout=30)
    assert answer.status_code == status, answer.text[:300]
    assert fragment in answer.json()["detail"], answer.json()
    assert healthy(tiny_gateway)


def test_no_redirect_from_client_headers_and_allow_on_405(tiny_gateway):
    answer = httpx.post(tiny_gateway + URL + "/", json={"embedding": [0.5] * 1024}, headers={"Host": "evil.example"},
                        timeout=30)
    assert answer.status_code == 404 and "location" not in answer.headers
    wrong = httpx.get(tiny_gateway + URL, timeout=5)
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"


def test_tritons_unused_api_groups_need_the_servers_key(tiny_triton):
    """Before: any local process could register the decoder stub's own region as system shared memory
    and write an inference output into it, killing the stub."""
    client = grpcclient.InferenceServerClient(tiny_triton.url)
    try:
        region = shm_regions(tiny_triton.options.shm_prefix)[0]
        assert region.stat().st_mode & 0o777 == 0o600
        with pytest.raises(InferenceServerException, match="restricted"):
            client.register_system_shared_memory("attack", "/" + region.name, 1024)
        with pytest.raises(InferenceServerException, match="restricted"):
            client.update_log_settings({"log_verbose_level": 1})
        with pytest.raises(InferenceServerException, match="restricted"):
            client.unload_model("decoder")
        key = {RESTRICTED_HEADER: tiny_triton.options.restricted_key}
        assert client.get_system_shared_memory_status(headers=key) is not None  # the key opens them
        assert client.is_model_ready("decoder")  # what the stack uses stays open
        assert client.get_inference_statistics("decoder") is not None
    finally:
        client.close()


@pytest.mark.serial  # refusals within the 3 s deadline: beside another worker they took 2.9 s
def test_over_capacity_requests_are_refused_at_once(tiny_triton, tmp_path):
    """Before: every request was queued, and those that could not be answered in time got a 504 at the deadline.

    Now a request the queue cannot answer in time is refused on arrival (503 with Retry-After), well
    before the deadline, and none waits for it."""
    deadline_s = 3.0
    gateway, base = start_gateway(tiny_triton.url, tmp_path / "gateway.log",
                                  env={"EMBCAP_REQUEST_TIMEOUT_S": str(deadline_s)})
    try:
        rows = np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)
        warm = httpx.post(base + URL, json={"embedding": rows[:32].ravel().tolist()}, timeout=60)  # measures the rate
        assert warm.status_code == 200
        body = json.dumps({"embedding": rows.ravel().tolist()})
        results: list[tuple[int, float, str | None]] = []

        def send() -> None:
            started = time.monotonic()
            answer = httpx.post(base + URL, content=body, headers={"content-type": "application/json"}, timeout=60)
            results.append((answer.status_code, time.monotonic() - started, answer.headers.get("retry-after")))

        burst = [threading.Thread(target=send) for _ in range(32)]  # ~2000 rows: far more than 3 s can answer
        for thread in burst:
            thread.start()
        for thread in burst:
            thread.join(90)
        assert len(results) == len(burst)
        assert {status for status, _, _ in results} <= {200, 503}, results  # no 504: nobody waited for the deadline
        refused = [(seconds, retry) for status, seconds, retry in results if status == 503]
        assert refused, results
        assert all(seconds < deadline_s and int(retry) >= 1 for seconds, retry in refused), refused
        assert httpx.post(base + URL, content=body, headers={"content-type": "application/json"},
                          timeout=60).status_code == 200  # the queue drained: served again
    finally:
        stop_process(gateway)
