"""Malformed requests against the live gateway: each gets a 4xx JSON error, never a 500,
and the server stays healthy (a smoke test of one case per answer, and what only a live server shows:
methods, body sizes, slow and aborted uploads)."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse

import httpx
import pytest
import requests

from embcap.inputs import realistic_embeddings
from gateway.settings import GatewaySettings

ROW = realistic_embeddings(1, seed=10)[0].tolist()  # evaluator-like: a mean of 15 unit vectors, norm < 1
URL = "/api/v1/inference"
LIMIT = GatewaySettings().max_body_bytes  # the test gateway runs with the defaults
DRAIN = GatewaySettings().max_drain_bytes


# One of each answer the live gateway gives a malformed body (the full table is tests/test_validation.py's).
# (case, body, content type, status, fragment of the detail)
CASES = [
    ("not JSON", b"hello", "application/json", 400, "not valid JSON"),
    ("deeply nested", b"[" * 100_000 + b"]" * 100_000, "application/json", 400, "not valid JSON"),
    ("wrong field name", json.dumps({"embeddings": ROW}).encode(), "application/json", 422,
     "missing field 'embedding'"),
    ("NaN", b'{"embedding": [' + b"0.5, " * 1023 + b"NaN]}", "application/json", 422, "NaN"),
    ("batch above the served limit", json.dumps({"embedding": ROW * 257}).encode(), "application/json", 422,
     "limit of 256"),
    ("text/plain", json.dumps({"embedding": ROW}).encode(), "text/plain", 415, "not JSON"),
]


def raw_post(base: str, content_length: int, body_start: bytes, timeout_s: float = 30,
             expect_continue: bool = False) -> str:
    """Send headers and only the start of a body over a raw socket; return the full reply."""
    address = urlparse(base)
    expect = "Expect: 100-continue\r\n" if expect_continue else ""
    with socket.create_connection((address.hostname, address.port), timeout=timeout_s) as sock:
        sock.sendall(f"POST {URL} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{expect}"
                     f"Content-Length: {content_length}\r\n\r\n".encode() + (b"" if expect else body_start))
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < _length(reply):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply.decode()


def _length(reply: bytes) -> int:
    for line in reply.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def assert_healthy(base: str) -> None:
    response = httpx.get(base + "/api/v1/health", timeout=5)
    assert response.status_code == 200 and response.json()["status"] == "healthy"


@pytest.mark.parametrize(("case", "body", "content_type", "status", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_malformed_request(tiny_gateway, case, body, content_type, status, fragment):
    response = httpx.post(tiny_gateway + URL, content=body, headers={"content-type": content_type}, timeout=30)
    assert response.status_code == status, response.text
    payload = response.json()
    assert fragment in payload["detail"], payload
    assert payload["error"] and response.headers["x-request-id"]
    assert_healthy(tiny_gateway)


def test_wrong_method_is_a_json_405(tiny_gateway):
    response = httpx.get(tiny_gateway + URL, timeout=5)
    assert response.status_code == 405 and response.json()["error"] == "http_405"


def oversized(size: int) -> bytes:
    return b'{"embedding": [' + b"0.1, " * ((size - 17) // 5) + b"0.1]}"


def urllib_post(base: str, data, content_type: str = "application/json") -> tuple[int, dict]:
    """POST as urllib does: `Connection: close`, the whole body written before the answer is read."""
    request = urllib.request.Request(base + URL, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_oversized_body_is_answered_to_clients_that_send_it_all_first(tiny_gateway):
    body = oversized(LIMIT + 1024 * 1024)
    assert LIMIT < len(body) < DRAIN
    status, payload = urllib_post(tiny_gateway, body)  # before the lingering read: ConnectionResetError
    assert status == 413 and payload["error"] == "body_too_large" and str(LIMIT) in payload["detail"]
    status, payload = urllib_post(tiny_gateway, iter([body[:LIMIT // 2], body[LIMIT // 2:]]))  # chunked
    assert status == 413 and payload["error"] == "body_too_large"
    with requests.Session() as session:  # keep-alive: the same connection serves the next request
        response = session.post(tiny_gateway + URL, data=body, headers={"Content-Type": "application/json"},
                                timeout=60)
        assert response.status_code == 413 and response.json()["error"] == "body_too_large"
        assert response.headers.get("connection") != "close"
        ok = session.post(tiny_gateway + URL, json={"embedding": ROW}, timeout=30)
        assert ok.status_code == 200 and len(ok.json()["texts"]) == 1
    # Any refusal reads the body first: a 256-row body refused as text/plain also reset urllib before.
    full = json.dumps({"embedding": realistic_embeddings(256, seed=11).ravel().tolist()}).encode()
    status, payload = urllib_post(tiny_gateway, full, "text/plain")
    assert status == 415 and payload["error"] == "unsupported_media_type"
    assert_healthy(tiny_gateway)


def test_oversized_body_beyond_the_drain_bound_is_refused_from_its_content_length(tiny_gateway):
    started = time.monotonic()
    reply = raw_post(tiny_gateway, 10**9, b'{"embedding": [')  # answered without the remaining gigabyte
    assert reply.startswith("HTTP/1.1 413") and "body_too_large" in reply
    assert "connection: close" in reply.lower() and time.monotonic() - started < 1.5
    reply = raw_post(tiny_gateway, LIMIT + 1, b'{"embedding": [', expect_continue=True)  # nothing sent yet
    assert reply.startswith("HTTP/1.1 413") and "100 Continue" not in reply
    assert_healthy(tiny_gateway)


def test_slow_oversized_upload_is_refused_within_the_body_timeout(tiny_gateway):
    started = time.monotonic()
    reply = raw_post(tiny_gateway, LIMIT + 1, b'{"embedding": [0.1, ')  # the rest never comes
    assert reply.startswith("HTTP/1.1 413") and "body_too_large" in reply and "connection: close" in reply.lower()
    assert 1.5 < time.monotonic() - started < 15  # lingered for the test gateway's 2 s body timeout, no longer
    assert_healthy(tiny_gateway)


def test_oversized_chunked_body_is_cut_off(tiny_gateway):
    def chunks():
        yield b'{"embedding": ['
        for _ in range(300):
            yield b"0.123456789, " * 5000  # ~65 KB a chunk, ~19 MB in all
    response = httpx.post(tiny_gateway + URL, content=chunks(), headers={"content-type": "application/json"},
                          timeout=60)
    assert response.status_code == 413
    assert_healthy(tiny_gateway)


def test_slow_upload_times_out_with_408(tiny_gateway):
    started = time.monotonic()
    reply = raw_post(tiny_gateway, 50_000, b'{"embedding": [0.1, ')  # the rest never comes
    assert reply.startswith("HTTP/1.1 408") and "body_timeout" in reply
    assert time.monotonic() - started < 15  # the test gateway's body timeout is 2 s
    assert_healthy(tiny_gateway)


def test_aborted_upload_leaves_the_server_healthy(tiny_gateway):
    address = urlparse(tiny_gateway)
    for _ in range(5):
        with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
            sock.sendall(f"POST {URL} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Content-Length: 50000\r\n\r\n".encode() + b'{"embedding": [0.1, 0.2')
    assert_healthy(tiny_gateway)
    ok = httpx.post(tiny_gateway + URL, json={"embedding": ROW}, timeout=30)
    assert ok.status_code == 200 and len(ok.json()["texts"]) == 1
