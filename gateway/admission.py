"""Admission control: refuse at once what could not be answered before the deadline.

The gateway counts the rows it has handed to Triton and not yet had answered, and
measures the rate at which Triton answers rows while it has work (rows answered per
busy second, over the last `window_s`). A new request whose rows would, behind those
already queued, finish after the deadline at that rate is refused with 503 and a
`Retry-After` at once, instead of waiting for a 504 at the deadline. A request is always
admitted when nothing is queued, or before any rate has been measured.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

from gateway.protocol import BackendError


class OverCapacity(BackendError):
    """503: the request would be answered after the deadline; `retry_after_s` says when to try again."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(503, "over_capacity", message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Decision:
    """Whether to admit a request, and if not, when to try again."""

    admit: bool
    expected_s: float | None = None  # when its last row would be answered at the measured rate
    retry_after_s: int = 0


class Admission:
    """Rows in flight and the measured rate of answered rows; `decide` before, `started`/`finished` around a call."""

    def __init__(self, deadline_s: float, window_s: float = 30.0, clock=time.monotonic) -> None:
        self.deadline_s = deadline_s
        self.window_s = window_s
        self.clock = clock
        self.rows_in_flight = 0
        self._busy_s = 0.0  # seconds with rows in flight, in all
        self._answered = 0  # rows answered, in all
        self._since: float | None = None  # start of the current busy stretch
        self._samples: deque[tuple[float, float, int]] = deque()  # (time, busy seconds, rows answered)

    def _busy_now(self, now: float) -> float:
        return self._busy_s + (now - self._since if self._since is not None else 0.0)

    def rate(self) -> float | None:
        """Rows answered per busy second over the window; None until something was answered."""
        now = self.clock()
        while len(self._samples) > 2 and now - self._samples[0][0] > self.window_s:
            self._samples.popleft()
        if not self._samples:
            return None
        _, busy_then, rows_then = self._samples[0]
        busy, rows = self._busy_now(now) - busy_then, self._answered - rows_then
        if len(self._samples) == 1:  # one answer so far: its rows over the busy time up to it
            busy, rows = self._samples[0][1], self._samples[0][2]
        return rows / busy if busy > 0 and rows > 0 else None

    def decide(self, rows: int) -> Decision:
        """Admit `rows` unless the rows already queued would push them past the deadline."""
        rate = self.rate()
        if self.rows_in_flight == 0 or rate is None:
            return Decision(True)
        expected = (self.rows_in_flight + rows) / rate
        if expected <= self.deadline_s:
            return Decision(True, expected)
        return Decision(False, expected, max(1, math.ceil(expected - self.deadline_s)))

    def check(self, rows: int) -> None:
        """Raise OverCapacity unless `rows` are admitted (see `decide`)."""
        decision = self.decide(rows)
        if not decision.admit:
            raise OverCapacity(f"{self.rows_in_flight} rows are queued ahead of these {rows}; at the measured "
                               f"{self.rate():.1f} rows/s they would be answered in ~{decision.expected_s:.0f} s, "
                               f"past the {self.deadline_s:g} s deadline: retry after {decision.retry_after_s} s",
                               decision.retry_after_s)

    def started(self, rows: int) -> None:
        if self.rows_in_flight == 0:
            self._since = self.clock()
        self.rows_in_flight += rows

    def finished(self, rows: int, answered: bool) -> None:
        """`rows` left Triton: answered (they count for the rate) or failed."""
        now = self.clock()
        self.rows_in_flight -= rows
        if self.rows_in_flight == 0 and self._since is not None:
            self._busy_s += now - self._since
            self._since = None
        if answered:
            self._answered += rows
            self._samples.append((now, self._busy_now(now), self._answered))
