"""Reading a request body within a size and time limit, with a lingering close for oversized ones.

A client that writes its whole body before reading the answer (Python's `urllib`
sends `Connection: close` and does) gets "connection reset" if the server answers
413 and closes while body bytes are still unread: the kernel resets a socket closed
with unread data. So, as nginx's lingering close does, an oversized body is read and
discarded up to `drain_limit` bytes and the time left of the body deadline before
the 413 goes out. Beyond those bounds the 413 is sent at once with `Connection:
close`: a slow or huge upload costs no more than the body timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from starlette.requests import ClientDisconnect, Request

from gateway.protocol import RequestError


class BodyTooLarge(RequestError):
    """413; `drained` says whether the whole body was read (else the connection must close)."""

    def __init__(self, message: str, drained: bool) -> None:
        super().__init__(413, "body_too_large", message)
        self.drained = drained


async def read_body(request: Request, limit: int, timeout_s: float, drain_limit: int) -> bytes:
    """The body, at most `limit` bytes, received within `timeout_s`; else BodyTooLarge / 408 / 400."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    declared = _declared_length(request)
    if declared is not None and declared > limit:
        # A client that waits for "100 Continue" has sent nothing: answer without inviting the body.
        drain = declared <= drain_limit and request.headers.get("expect", "").lower() != "100-continue"
        drained = drain and await _discard(request.stream(), drain_limit, deadline)
        raise BodyTooLarge(f"body of {declared} bytes exceeds the limit of {limit}", drained)
    chunks, size = [], 0
    stream = request.stream()
    try:
        async with asyncio.timeout_at(deadline):
            async for chunk in stream:
                size += len(chunk)
                if size > limit:
                    break
                chunks.append(chunk)
    except TimeoutError:
        raise RequestError(408, "body_timeout", f"body not received within {timeout_s:g} s") from None
    except ClientDisconnect:
        raise RequestError(400, "client_disconnected", "the client closed the connection mid-body") from None
    if size > limit:  # a chunked body (no Content-Length) ran past the limit
        drained = await _discard(stream, drain_limit - size, deadline)
        raise BodyTooLarge(f"body exceeds the limit of {limit} bytes", drained)
    return b"".join(chunks)


def held_size(request: Request, limit: int) -> int:
    """The bytes a request's body will hold in memory: its Content-Length, the limit when it has none,
    0 when it is refused from its Content-Length (an oversized body is discarded as it is read)."""
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit():
        return limit
    return int(declared) if int(declared) <= limit else 0


def _declared_length(request: Request) -> int | None:
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    if not declared.isdigit():
        raise RequestError(400, "invalid_content_length", "Content-Length is not a number")
    return int(declared)


async def _discard(stream: AsyncIterator[bytes], budget: int, deadline: float) -> bool:
    """Read and drop the rest of `stream`; True if it ended within `budget` bytes and `deadline`."""
    try:
        async with asyncio.timeout_at(deadline):
            async for chunk in stream:
                budget -= len(chunk)
                if budget < 0:
                    return False
    except (TimeoutError, ClientDisconnect):
        return False
    return True


class MemoryBudget:
    """Bytes of request bodies held in memory at once, across requests (a body and what is parsed from it).

    A request reserves its body's size (the limit when it has no Content-Length) before reading it and
    keeps it until its rows are built; beyond the budget it waits, and after `wait_s` it is refused (503)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.held = 0
        self._waiting = 0  # requests waiting for room: while any wait, a newcomer queues behind them
        self._freed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def reserve(self, size: int, wait_s: float):
        size = min(size, self.budget_bytes)  # one body up to the limit always fits an empty budget
        if self._waiting or self.held + size > self.budget_bytes:  # else room now: no lock, no timer task
            await self._wait_for_room(size, wait_s)
        self.held += size  # one event loop: nothing runs between the check and this line
        try:
            yield
        finally:
            self.held -= size
            if self._waiting:
                async with self._freed:
                    self._freed.notify_all()

    async def _wait_for_room(self, size: int, wait_s: float) -> None:
        self._waiting += 1
        try:
            async with self._freed:
                await asyncio.wait_for(self._freed.wait_for(lambda: self.held + size <= self.budget_bytes), wait_s)
        except TimeoutError:
            raise RequestError(503, "busy", f"{self.held} bytes of request bodies are held already (the "
                                            f"budget is {self.budget_bytes}): try again shortly") from None
        finally:
            self._waiting -= 1
