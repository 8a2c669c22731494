"""What the continuous engine measures for its load profile (embcap.load_profile).

- Seconds per loop iteration (its admissions' prefill and its decode step) by batch size in slots:
  per captured batch-size bucket, the mean slots and seconds of its last `window` iterations (a
  mean over many, not a fast moving average: one iteration that prefills a burst costs several
  steps, and the machine's other load comes and goes), seeded at start-up by timing steps of a few
  sizes (so that a burst is judged by measured larger steps, not by a lone request's rate).
- Decode steps from a request's admission to its answer, their mean and their most over the last
  `window` answered requests (before the first answer: max_new_tokens, the most a request can take;
  the most too until MIN_LONGEST_REQUESTS were answered: a lone warm-up request with a short caption
  must not make a 30-step one look impossible).
"""

from __future__ import annotations

import bisect
import collections

from embcap.load_profile import LoadProfile

STEP_WINDOW = 32  # iterations per batch-size bucket the step time is the mean of
STEPS_WINDOW = 64  # answered requests the steps-per-request figures cover
MIN_LONGEST_REQUESTS = 10  # answered requests before the longest of them stands for the longest there is


class LoadMeter:
    """Step times by batch size and steps per request; `profile()` is what they say."""

    def __init__(self, capacity: int, candidates: int, buckets: list[int], calibration: dict[int, float],
                 max_steps: int, window: int = STEPS_WINDOW) -> None:
        self.capacity = capacity
        self.candidates = candidates
        self.buckets = sorted(buckets)
        # bucket -> its last iterations as (slots, seconds)
        self.steps: dict[int, collections.deque[tuple[int, float]]] = {}
        for slots, seconds in calibration.items():
            self.step(slots, seconds)
        self.max_steps = max_steps
        self.requests: collections.deque[int] = collections.deque(maxlen=window)

    def _bucket(self, slots: int) -> int:
        return self.buckets[min(bisect.bisect_left(self.buckets, slots), len(self.buckets) - 1)]

    def step(self, slots: int, seconds: float) -> None:
        """One iteration of the loop with `slots` slots decoding took `seconds`."""
        bucket = self._bucket(slots)
        if bucket not in self.steps:
            self.steps[bucket] = collections.deque(maxlen=STEP_WINDOW)
        self.steps[bucket].append((slots, seconds))

    def answered(self, steps: int) -> None:
        """A request was answered `steps` decode steps after its admission."""
        self.requests.append(max(1, steps))

    def steps_per_request(self) -> tuple[float, float]:
        """Mean and most of the steps requests took."""
        if not self.requests:
            return float(self.max_steps), float(self.max_steps)
        mean, longest = sum(self.requests) / len(self.requests), max(self.requests)
        return mean, float(max(longest, self.max_steps) if len(self.requests) < MIN_LONGEST_REQUESTS else longest)

    def profile(self) -> LoadProfile | None:
        """The measured profile (None before any step was measured)."""
        if not self.steps:
            return None
        points = tuple(_mean_point(self.steps[bucket]) for bucket in sorted(self.steps))
        return LoadProfile(self.capacity, self.candidates, points, *self.steps_per_request())


def _mean_point(samples: collections.deque[tuple[int, float]]) -> tuple[float, float]:
    """(mean slots, mean seconds) of a bucket's iterations."""
    return round(sum(slots for slots, _ in samples) / len(samples), 2), sum(t for _, t in samples) / len(samples)
