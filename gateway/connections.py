"""Connection hygiene for uvicorn: header-read deadline, header size and count caps, a URL cap.

Uvicorn has settings for concurrency (`limit_concurrency`) and idle keep-alive connections
(`timeout_keep_alive`), but none for a client that connects and never finishes its
request head: a silent connection, one that sends a byte a second, an endless header, or
100,000 headers would each be held forever (and an endless header grows memory without
bound). `guarded_protocol(limits)` is uvicorn's own httptools protocol with those limits
added; it is passed to uvicorn as its `http` protocol class.

- A request head (request line and headers) must be complete within `header_timeout_s`
  of the connection opening or of the previous response: else the connection closes.
- The head may hold at most `max_header_bytes` bytes and `max_headers` headers; the URL at
  most `max_url_bytes`: else 431 (414 for the URL) and the connection closes.

It also sends a response's head and body in one write: uvicorn writes them in two calls, so the
client woke for the head alone and again for the body (~0.3 ms per request on a busy 2-core machine).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

REASONS = {408: b"Request Timeout", 414: b"URI Too Long", 431: b"Request Header Fields Too Large"}
CODES = {408: "head_timeout", 414: "url_too_long", 431: "head_too_large"}


@dataclass(frozen=True)
class ConnectionLimits:
    """What one connection may do before its request head is complete (see the module's docstring);
    the defaults are GatewaySettings'."""

    header_timeout_s: float
    max_header_bytes: int
    max_headers: int
    max_url_bytes: int


class _HeadRefused(Exception):
    """Raised inside a parser callback to stop parsing a request head over its limits."""


class PairedWrites:
    """A transport that holds one write until the next one, then sends both in one call: a response's head
    goes out with its body. A write that no other follows in the same turn of the event loop is sent at the
    start of the next (the head of a streamed response, `100 Continue`); closing sends what is held first."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop = transport, loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._held is None:
            self._held = bytes(data)
            self._loop.call_soon(self._send_held)
        else:
            data, self._held = self._held + data, None
            self._transport.write(data)

    def _send_held(self) -> None:
        if self._held is not None:
            data, self._held = self._held, None
            self._transport.write(data)

    def close(self) -> None:
        self._send_held()
        self._transport.close()

    def __getattr__(self, name: str):  # everything else is the transport's own (is_closing, pause_reading, ...)
        return getattr(self._transport, name)


def guarded_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """Uvicorn's httptools protocol with `limits` applied to every connection."""

    class GuardedProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(PairedWrites(transport, self.loop))  # type: ignore[arg-type]
            self._refusal: tuple[int, str] | None = None
            self._head_deadline: asyncio.TimerHandle | None = None
            self._awaiting_head()

        def _awaiting_head(self) -> None:
            self._head_bytes = 0
            self._head_count = 0
            self._url_bytes = 0
            self._in_head = True
            if self._head_deadline is not None:
                self._head_deadline.cancel()
            self._head_deadline = self.loop.call_later(limits.header_timeout_s, self._head_timed_out)

        def _head_done(self) -> None:
            self._in_head = False
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def _head_timed_out(self) -> None:
            self._head_deadline = None
            if self._in_head and not self.transport.is_closing():
                self._refuse(408, f"request head not received within {limits.header_timeout_s:g} s")

        def _refuse(self, status: int, message: str) -> None:
            body = json.dumps({"error": CODES[status], "detail": message}).encode()
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                                 % (status, REASONS[status], len(body), body))
            self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)
            # Checked after the parser ran: one read may carry the head and the body's start.
            if self._in_head and self._head_bytes > limits.max_header_bytes and not self.transport.is_closing():
                self._refuse(431, f"request head exceeds {limits.max_header_bytes} bytes")

        def send_400_response(self, msg: str) -> None:  # uvicorn's answer to a parser error
            if self._refusal is not None:
                self._refuse(*self._refusal)
            else:
                super().send_400_response(msg)

        def on_message_begin(self) -> None:
            if not self._in_head:  # a pipelined request: its head starts now
                self._awaiting_head()
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            self._url_bytes += len(url)
            if self._url_bytes > limits.max_url_bytes:
                self._refusal = (414, f"URL exceeds {limits.max_url_bytes} bytes")
                raise _HeadRefused()
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._head_count += 1
            if self._head_count > limits.max_headers:
                self._refusal = (431, f"more than {limits.max_headers} request headers")
                raise _HeadRefused()
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._head_done()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._awaiting_head()  # the keep-alive timeout closes an idle one sooner

    return GuardedProtocol
