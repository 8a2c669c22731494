"""Admission control: refuse at once what could not be answered before the deadline.

The gateway counts the rows it has handed to Triton and not yet had answered. A new request
whose rows would, behind those, be answered after the deadline is refused with 503 and a
`Retry-After` at once, instead of waiting for a 504 at the deadline. A request is always
admitted when nothing is queued.

When it runs in server.py, the gateway judges with the decoder's own load profile
(embcap.load_profile, published by the engine): the steps a request takes and the seconds per
step with the batch as full as the queued rows, the request's own and those of the requests
still arriving beside it will make it. A rate measured on a lone request is never applied to a
full batch, which answers many times more rows per second. A gateway without that profile (one
of its own, `python -m gateway`) measures the rate at which Triton answers rows while it has
work (rows answered per busy second over the last `window_s`) and judges with that, admitting
everything until something was measured.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from embcap.load_profile import LoadProfile
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
    expected_s: float | None = None  # when its last row would be answered (None: nothing to judge by yet)
    retry_after_s: int = 0


class Admission:
    """Rows in flight and what answering them costs. Around each request: `entered`/`left` (the handler),
    `check` before, `started`/`finished` around the Triton call."""

    def __init__(self, deadline_s: float, window_s: float = 30.0, clock=time.monotonic,
                 profile_source: Callable[[], LoadProfile | None] | None = None) -> None:
        self.deadline_s = deadline_s
        self.window_s = window_s
        self.clock = clock
        self.profile_source = profile_source
        self.rows_in_flight = 0
        self.requests = 0  # requests in the handler
        self.requests_in_flight = 0  # of those, handed to Triton
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

    def _profile(self) -> LoadProfile | None:
        return self.profile_source() if self.profile_source is not None else None

    def estimate_s(self, rows: int) -> float | None:
        """Seconds until `rows` more rows would be answered behind those in flight (None: nothing to judge by)."""
        profile = self._profile()
        if profile is not None:
            arriving = max(0, self.requests - self.requests_in_flight - 1)  # besides the one asking
            return profile.seconds_to_answer(self.rows_in_flight, rows, arriving * rows)
        rate = self.rate()
        return None if rate is None else (self.rows_in_flight + rows) / rate

    def decide(self, rows: int) -> Decision:
        """Admit `rows` unless the rows already queued would push them past the deadline."""
        expected = self.estimate_s(rows)
        if self.rows_in_flight == 0 or expected is None or expected <= self.deadline_s:
            return Decision(True, expected)
        return Decision(False, expected, max(1, math.ceil(expected - self.deadline_s)))

    def check(self, rows: int) -> Decision:
        """The admitting Decision for `rows`; raise OverCapacity if they are refused (see `decide`)."""
        decision = self.decide(rows)
        if decision.admit:
            return decision
        profile = self._profile()
        how = (f"with the batch that full the decoder answers {profile.rows_per_s(self.rows_in_flight + rows):.1f} "
               "rows/s" if profile is not None else f"at the measured {self.rate():.1f} rows/s")
        raise OverCapacity(f"{self.rows_in_flight} rows are queued ahead of these {rows}; {how}, they would be "
                           f"answered in ~{decision.expected_s:.0f} s, past the {self.deadline_s:g} s deadline: "
                           f"retry after {decision.retry_after_s} s", decision.retry_after_s)

    def entered(self) -> None:
        """A request entered the handler (until it is handed to Triton, it is arriving)."""
        self.requests += 1

    def left(self) -> None:
        self.requests -= 1

    def started(self, rows: int) -> None:
        if self.rows_in_flight == 0:
            self._since = self.clock()
        self.rows_in_flight += rows
        self.requests_in_flight += 1

    def finished(self, rows: int, answered: bool) -> None:
        """`rows` left Triton: answered (they count for the rate) or failed."""
        now = self.clock()
        self.rows_in_flight -= rows
        self.requests_in_flight -= 1
        if self.rows_in_flight == 0 and self._since is not None:
            self._busy_s += now - self._since
            self._since = None
        if answered:
            self._answered += rows
            self._samples.append((now, self._busy_now(now), self._answered))
