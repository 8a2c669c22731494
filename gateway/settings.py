"""Gateway settings, read from EMBCAP_* environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from embcap.contract import ENSEMBLE
from embcap.deadlines import DEFAULT_REQUEST_TIMEOUT_S
from gateway.connections import ConnectionLimits, guarded_protocol
from gateway.protocol import DEFAULT_MAX_ROWS


@dataclass(frozen=True)
class GatewaySettings:
    """Every knob of the HTTP gateway; the env var is EMBCAP_<FIELD NAME IN CAPITALS>."""

    triton_url: str = "127.0.0.1:8001"  # Triton gRPC address
    triton_server_id: str = ""  # the id that Triton must answer in its metadata ("": any; server.py sets its own)
    model: str = ENSEMBLE
    max_rows: int = DEFAULT_MAX_ROWS  # embeddings per request
    max_body_bytes: int = 16 * 1024 * 1024  # requests above this are refused before being read in full
    # A body above max_body_bytes is still read and discarded up to this size before the 413,
    # so that clients which send the whole body before reading (urllib) get the answer.
    max_drain_bytes: int = 64 * 1024 * 1024
    body_timeout_s: float = 10.0  # a body not fully received by then gets 408 (slow uploads)
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S  # per Triton call (embcap.deadlines)
    health_timeout_s: float = 1.0  # per readiness probe
    startup_wait_s: float = 30.0  # how long a request that arrives before the model is ready waits
    max_buffered_bytes: int = 64 * 1024 * 1024  # request bodies held in memory at once, all requests together
    buffer_wait_s: float = 1.0  # how long a request waits for room under max_buffered_bytes before a 503
    parse_threads: int = 1  # threads that parse bodies off the event loop
    # Bodies up to this are parsed on the event loop (4 rows are ~90 KB, ~0.4 ms to parse); larger ones in a
    # parse thread. 256 KiB keeps the loop's longest parse near a millisecond.
    inline_parse_bytes: int = 256 * 1024
    # Connections (gateway.connections, and uvicorn's own limit_concurrency and timeout_keep_alive):
    limit_concurrency: int = 1000  # open connections (or requests) at once; beyond, uvicorn answers 503
    keep_alive_s: int = 5  # an idle keep-alive connection is closed after this
    header_timeout_s: float = 10.0  # a request head (line and headers) not complete by then: the connection closes
    max_header_bytes: int = 16 * 1024  # request line and headers; beyond: 431
    max_headers: int = 100  # headers per request; beyond: 431
    max_url_bytes: int = 8 * 1024  # beyond: 414

    def connection_limits(self) -> ConnectionLimits:
        """The limits on a request head (gateway.connections)."""
        return ConnectionLimits(self.header_timeout_s, self.max_header_bytes, self.max_headers, self.max_url_bytes)

    def uvicorn_options(self) -> dict:
        """Uvicorn's own connection settings, and its HTTP protocol with the head limits."""
        return {"limit_concurrency": self.limit_concurrency, "timeout_keep_alive": self.keep_alive_s,
                "http": guarded_protocol(self.connection_limits())}

    @classmethod
    def from_env(cls, **overrides) -> "GatewaySettings":
        """Defaults, then EMBCAP_* variables, then explicit overrides."""
        values = {}
        for field in fields(cls):
            raw = os.environ.get(f"EMBCAP_{field.name.upper()}")
            if raw is not None:
                values[field.name] = type(field.default)(raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
