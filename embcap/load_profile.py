"""How long the continuous engine takes to answer rows, as a function of how full its batch will be.

A decode step costs more with more rows in the batch, but far less than proportionally: on this
project's 2-core CPU host the default decoder's step took 54 ms for 1 slot, 108 ms for 4 and 530 ms
for 64 (a rows/s rate measured on one lone request and applied to a full batch overestimated the
burst's completion 4-10 times). So the estimate keeps what the engine measures: the seconds per step
at each batch size in slots (a row takes one slot per best-of-N candidate) and the steps a request
takes from its admission to its answer. The engine measures these and refuses with them
(embcap.engines.continuous); it also publishes them (`to_json`, embcap.contract.engine_profile_file),
and the gateway in server.py judges its own queue with the same arithmetic (gateway.admission).

No torch here: the gateway imports this module.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LoadProfile:
    """The engine's measured costs: enough to tell when rows would be answered."""

    capacity: int  # rows that decode at once
    candidates: int  # slots per row (best-of-N)
    step_s: tuple[tuple[float, float], ...]  # (slots, seconds per step with that many slots busy), ascending
    steps_per_request: float  # decode steps from a request's admission to its answer (its longest caption): mean
    steps_longest: float  # ... and the most recently taken (a request's own decode is judged by both)

    def __post_init__(self) -> None:
        if self.capacity < 1 or self.candidates < 1 or not self.step_s or not 0 < self.steps_per_request \
                <= self.steps_longest:
            raise ValueError(f"an incomplete load profile: {self}")
        slots = [size for size, _ in self.step_s]
        if slots != sorted(set(slots)) or any(seconds <= 0 for _, seconds in self.step_s):
            raise ValueError(f"step times must be positive, by ascending batch size: {self.step_s}")

    def step_seconds(self, slots: int) -> float:
        """Seconds per step with `slots` busy: linear between measured sizes, and beyond the largest along
        the line through the last two (never less than the largest measured)."""
        points = self.step_s
        if slots <= points[0][0] or len(points) == 1:
            first_slots, first = points[0]
            return first if slots <= first_slots else first * slots / first_slots  # one point: proportional
        for (low, low_s), (high, high_s) in zip(points, points[1:]):
            if slots <= high:
                return low_s + (high_s - low_s) * (slots - low) / (high - low)
        (low, low_s), (high, high_s) = points[-2], points[-1]
        return max(high_s, high_s + (high_s - low_s) * (slots - high) / (high - low))

    def seconds_to_answer(self, rows_ahead: int, rows: int, rows_behind: int = 0) -> float:
        """Seconds until a request of `rows` rows is answered behind `rows_ahead` rows (decoding or queued,
        first come first served): its own steps at the batch that all of them fill, with `rows_behind` (rows
        arriving with it: they join its batch, not its queue) and at most the capacity; before them, when the
        rows ahead exceed the capacity, a request's mean steps per batch-full of rows that must leave first."""
        total = max(0, rows_ahead) + max(1, rows)
        batch = min(total + max(0, rows_behind), self.capacity)
        steps = self.own_steps() + self.steps_per_request * max(0.0, total / batch - 1)
        return steps * self.step_seconds(batch * self.candidates)

    def own_steps(self) -> float:
        """The steps a request's own decode is judged by: the mean, and at least half the longest. The default
        model's captions are bimodal (most 4-row requests end within ~10 steps, about one in six runs to the
        32-token limit): no single figure is near both, and this one is never below half a request's steps."""
        return max(self.steps_per_request, self.steps_longest / 2)

    def rows_per_s(self, rows: int) -> float:
        """Rows answered per second with `rows` rows decoding (for messages)."""
        rows = max(1, min(rows, self.capacity))
        return rows / (self.steps_per_request * self.step_seconds(rows * self.candidates))

    def scaled(self, instances: int) -> "LoadProfile":
        """The profile of `instances` engines like this one that share the requests evenly."""
        if instances == 1:
            return self
        return LoadProfile(self.capacity * instances, self.candidates,
                           tuple((slots * instances, seconds) for slots, seconds in self.step_s),
                           self.steps_per_request, self.steps_longest)

    def to_json(self) -> str:
        return json.dumps({"capacity": self.capacity, "candidates": self.candidates,
                           "step_s": [[slots, seconds] for slots, seconds in self.step_s],
                           "steps_per_request": self.steps_per_request,
                           "steps_longest": self.steps_longest})

    @classmethod
    def from_json(cls, text: str) -> "LoadProfile":
        """Parse `to_json`'s text; ValueError when it is not a complete profile."""
        try:
            data = json.loads(text)
            profile = cls(int(data["capacity"]), int(data["candidates"]),
                          tuple((float(slots), float(seconds)) for slots, seconds in data["step_s"]),
                          float(data["steps_per_request"]), float(data["steps_longest"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a load profile: {exc}") from None
        if not all(math.isfinite(seconds) for _, seconds in profile.step_s):
            raise ValueError("not a load profile: a step time is not finite")
        return profile
