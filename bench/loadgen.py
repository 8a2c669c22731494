"""Load generator for the gateway and the baseline: closed loop (`run_level`) and open loop (`run_open_loop`).

Each of `concurrency` workers keeps one keep-alive HTTP/1.1 connection and sends
evaluator-shaped requests (`{"embedding": [rows*1024 floats]}`) back to back until
the level's request count is issued or its duration is up; then in-flight requests
finish. Bodies are encoded before the clock starts and the client is a few lines of
asyncio streams, so the generator itself costs little CPU on the shared cores.

Traffic goes to 127.0.0.1 only; every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import numpy as np
import orjson


class HttpError(Exception):
    pass


def encode_bodies(pool: np.ndarray) -> list[bytes]:
    """One JSON body per request of the [requests, rows, 1024] pool."""
    return [orjson.dumps({"embedding": request.reshape(-1).tolist()}) for request in pool]


class Connection:
    """A minimal keep-alive HTTP/1.1 client for POSTing JSON to one local server."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise HttpError("connection closed by the server")
        status = int(status_line.split()[1])
        length, close = None, False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value.strip())
            elif name == "connection" and value.strip().lower() == "close":
                close = True
            elif name == "transfer-encoding":
                raise HttpError("chunked responses are not supported by this client")
        if length is None:
            raise HttpError("response without Content-Length")
        payload = await self.reader.readexactly(length)
        if close:
            await self.close()
        return status, payload


@dataclass
class LevelResult:
    concurrency: int
    requests: int  # completed (ok or not)
    ok: int
    errors: int
    timeouts: int
    captions: int
    wall_s: float
    captions_per_s: float
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    ramp_requests: int = 0  # each worker's first request: counted for throughput, not for latency
    over_deadline: int = 0  # answered, but later than the evaluator's deadline (60 s)
    refused: int = 0  # of the errors: 503 over_capacity, the gateway's admission refusing what it could not answer
    error_samples: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


EVALUATOR_DEADLINE_S = 60.0
FAILURES = (OSError, HttpError, asyncio.IncompleteReadError, ValueError)


def _local_address(base_url: str) -> tuple[str, int]:
    url = urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError("the load generator only talks to local servers")
    return host, port


async def _send(connection: Connection, path: str, body: bytes, rows: int, timeout_s: float) -> tuple[float, str]:
    """One request: (seconds, "") when it was answered with `rows` captions, else (0, what went wrong); a
    connection that failed is closed (the next request opens a new one)."""
    sent = time.perf_counter()
    try:
        status, payload = await asyncio.wait_for(connection.post(path, body), timeout_s)
    except (asyncio.TimeoutError, *FAILURES) as exc:
        await connection.close()
        timed_out = isinstance(exc, asyncio.TimeoutError)
        return 0.0, f"timeout after {timeout_s:.0f} s" if timed_out else f"{type(exc).__name__}: {exc}"
    elapsed = time.perf_counter() - sent
    if status != 200:
        return 0.0, f"HTTP {status}: {payload[:200]!r}"
    texts = orjson.loads(payload).get("texts", [])
    return (elapsed, "") if len(texts) == rows else (0.0, f"{len(texts)} captions for {rows} rows")


def refusal(error: str) -> bool:
    """Whether `_send`'s error is the gateway's admission refusal (503 over_capacity)."""
    return error.startswith("HTTP 503:") and '"over_capacity"' in error


def _result(concurrency: int, latencies: list[float], ramp: list[float], errors: list[str], rows: int,
            wall: float, **more) -> LevelResult:
    ms, ok = [1000 * v for v in latencies], len(latencies) + len(ramp)
    return LevelResult(
        concurrency=concurrency, requests=ok + len(errors), ok=ok, errors=len(errors),
        timeouts=sum(e.startswith("timeout") for e in errors), captions=ok * rows, wall_s=wall,
        captions_per_s=ok * rows / wall if wall else 0.0, requests_per_s=ok / wall if wall else 0.0,
        p50_ms=percentile(ms, 50), p95_ms=percentile(ms, 95), p99_ms=percentile(ms, 99),
        mean_ms=float(np.mean(ms)) if ms else float("nan"), ramp_requests=len(ramp),
        over_deadline=sum(v > EVALUATOR_DEADLINE_S for v in latencies + ramp),
        refused=sum(refusal(e) for e in errors), error_samples=errors[:5], **more)


async def run_level(base_url: str, bodies: list[bytes], rows_per_request: int, concurrency: int, requests: int,
                    duration_s: float, timeout_s: float = 300.0, path: str = "/api/v1/inference") -> LevelResult:
    """Closed loop at `concurrency` until `requests` are issued or `duration_s` passes."""
    host, port = _local_address(base_url)
    issued = 0
    latencies: list[float] = []
    ramp: list[float] = []
    errors: list[str] = []
    started = time.perf_counter()
    deadline = started + duration_s

    async def worker() -> None:
        nonlocal issued
        connection, answered = Connection(host, port), 0
        try:
            while issued < requests and time.perf_counter() < deadline:
                issued += 1
                elapsed, error = await _send(connection, path, bodies[(issued - 1) % len(bodies)],
                                             rows_per_request, timeout_s)
                if error:
                    errors.append(error)
                else:
                    (latencies if answered else ramp).append(elapsed)  # each worker's first: ramp-up
                    answered += 1
        finally:
            await connection.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    if not latencies:  # each worker made one request only: use them all
        latencies, ramp = ramp, []
    return _result(concurrency, latencies, ramp, errors, rows_per_request, wall)


async def run_open_loop(base_url: str, bodies: list[bytes], rows_per_request: int, rate_rps: float, requests: int,
                        timeout_s: float = 300.0, seed: int = 0, path: str = "/api/v1/inference") -> LevelResult:
    """Open loop: `requests` requests at Poisson arrival times of mean rate `rate_rps`, each on a new
    connection (as the evaluator sends them), whether or not earlier ones have been answered.

    `concurrency` is reported as 0; every latency is kept in `extra["latencies_ms"]` (for intervals)."""
    host, port = _local_address(base_url)
    if rate_rps <= 0:
        raise ValueError("the arrival rate must be positive")
    gaps = np.random.default_rng(seed).exponential(1.0 / rate_rps, size=requests)
    latencies: list[float] = []
    errors: list[str] = []
    started = time.perf_counter()

    async def one(index: int, at: float) -> None:
        await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
        connection = Connection(host, port)
        try:
            elapsed, error = await _send(connection, path, bodies[index % len(bodies)], rows_per_request, timeout_s)
        finally:
            await connection.close()
        if error:
            errors.append(error)
        else:
            latencies.append(elapsed)

    await asyncio.gather(*(one(i, at) for i, at in enumerate(np.cumsum(gaps))))
    return _result(0, latencies, [], errors, rows_per_request, time.perf_counter() - started,
                   extra={"rate_rps": rate_rps, "latencies_ms": [1000 * v for v in latencies]})


def warm_up(base_url: str, bodies: list[bytes], rows_per_request: int, requests: int, concurrency: int = 1,
            timeout_s: float = 120.0) -> LevelResult:
    return asyncio.run(run_level(base_url, bodies, rows_per_request, concurrency, requests, 600.0, timeout_s))


def sweep(base_url: str, bodies: list[bytes], rows_per_request: int, levels: list[int], requests_for,
          duration_s: float, timeout_s: float = 300.0, before_level=None, after_level=None) -> list[LevelResult]:
    """Run every concurrency level; `requests_for(c)` is the request count at level c.
    `before_level`/`after_level` hooks (e.g. Triton statistics) may add to `result.extra`."""
    results = []
    for concurrency in levels:
        state = before_level(concurrency) if before_level else None
        result = asyncio.run(run_level(base_url, bodies, rows_per_request, concurrency, requests_for(concurrency),
                                       duration_s, timeout_s))
        if after_level:
            result.extra.update(after_level(concurrency, state) or {})
        results.append(result)
    return results
