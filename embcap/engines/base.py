"""The seam between the Triton decoder model and a decoding engine."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np


class Cancelled(Exception):
    """The request was cancelled (its client went away or its deadline passed) before it finished."""


@dataclass
class Job:
    """One request's rows and how to answer it.

    `finish` is called exactly once, with the captions (the engine's `candidates` per row,
    row by row, in order) or with the exception that failed the request. `cancelled` is polled while the
    rows decode; when it turns true the rows are dropped and `finish` gets Cancelled.
    """

    prefix: np.ndarray  # [rows, P, H] float32
    finish: Callable[[list[str] | None, BaseException | None], None]
    cancelled: Callable[[], bool] = field(default=lambda: False)
    created: float = field(default_factory=time.monotonic)  # the request deadline counts from here

    @property
    def rows(self) -> int:
        return len(self.prefix)


@dataclass
class EngineStats:
    """Counters an engine keeps for the model's metrics."""

    blank_fallbacks: int = 0  # rows that stayed blank up to max_new_tokens and got the fallback text
    cancelled_rows: int = 0


class Engine(Protocol):
    """A decoding engine: takes jobs, answers each through its `finish` callback."""

    name: str
    stats: EngineStats
    candidates: int  # captions per row in every answer

    def submit(self, jobs: list[Job]) -> None:
        """Hand over jobs; they may be answered before this returns (hf) or later (continuous)."""

    def close(self) -> None:
        """Stop; jobs not yet answered get an error."""


def generate_blocking(engine: Engine, prefix: np.ndarray, timeout_s: float | None = None) -> list[str]:
    """Submit one job and wait for its captions (for tools and tests, not the serving path)."""
    done = threading.Event()
    result: dict[str, object] = {}

    def finish(texts: list[str] | None, error: BaseException | None) -> None:
        result["texts"], result["error"] = texts, error
        done.set()

    engine.submit([Job(np.asarray(prefix, dtype=np.float32), finish)])
    if not done.wait(timeout_s):
        raise TimeoutError(f"engine {engine.name} did not answer within {timeout_s} s")
    if result["error"] is not None:
        raise result["error"]  # type: ignore[misc]
    return result["texts"]  # type: ignore[return-value]
