"""'Can the model serve?': the supervisor's view (processes) and Triton's (server, model, identity)."""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from gateway.triton_client import TritonCaptioner

StatusSource = Callable[[], str | None]  # returns what keeps the model from serving, or None


class Readiness:
    """'Can the model serve?': the supervisor's view (processes) and Triton's (server + model)."""

    def __init__(self, captioner: TritonCaptioner, status_source: StatusSource | None, ttl_s: float = 0.25):
        self.captioner = captioner
        self.status_source = status_source
        self.ttl_s = ttl_s
        self.ever_ready = False
        self._checked_at = -1.0
        self._state: tuple[bool, str | None] = (False, "not checked yet")

    async def check(self, fresh: bool = False) -> tuple[bool, str | None]:
        problem = self.status_source() if self.status_source else None
        if problem:
            return False, problem
        if fresh or time.monotonic() - self._checked_at > self.ttl_s:
            self._state = await self.captioner.readiness()
            self._checked_at = time.monotonic()
            self.ever_ready = self.ever_ready or self._state[0]
        return self._state

    async def wait(self, startup_wait_s: float) -> tuple[bool, str | None]:
        """Before the first ready moment, wait up to `startup_wait_s`; after it, answer at once.

        Once seen ready, Triton is not asked again per request (two gRPC round trips); a
        dead server then fails the inference call itself with 503, and the supervisor's
        process watch reports through `status_source`."""
        problem = self.status_source() if self.status_source else None
        if self._state[0] and not problem:
            return self._state
        state = await self.check()
        if state[0] or self.ever_ready:
            return state
        deadline = time.monotonic() + startup_wait_s
        while not state[0] and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            state = await self.check(fresh=True)
        return state
