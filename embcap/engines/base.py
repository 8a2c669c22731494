"""The seam between the Triton decoder model and a decoding engine."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

log = logging.getLogger(__name__)
MAX_STEP_TIMES = 10_000  # step durations kept between two metrics reports


class Cancelled(Exception):
    """The request was cancelled (its client went away or its deadline passed) before it finished."""


class EngineFailed(RuntimeError):
    """The engine can no longer decode: its loop died or its steps kept failing (the reason is the message)."""


class Overloaded(RuntimeError):
    """The engine's backlog is full: the request was refused at once rather than queued past its deadline."""


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
    """Counters an engine keeps for the model's metrics (only ever increased; embcap.engines.metrics exports them)."""

    blank_fallbacks: int = 0  # rows that stayed blank up to max_new_tokens and got the fallback text
    cancelled_rows: int = 0
    refused_rows: int = 0  # rows of requests refused because the backlog was full
    failed_steps: int = 0  # decode steps (or admissions) that raised
    steps: int = 0
    step_rows: int = 0  # rows decoded, summed over steps (rows per step = step_rows / steps)
    admitted_jobs: int = 0
    queue_wait_s: float = 0.0  # summed over admitted jobs: submission to the start of their prefill
    step_times: list[float] = field(default_factory=list)  # recent step durations, drained by the metrics

    def record_step(self, rows: int, seconds: float) -> None:
        """Count one decode step (hf: one generate() call) of `rows` rows that took `seconds`."""
        self.steps += 1
        self.step_rows += rows
        if len(self.step_times) < MAX_STEP_TIMES:  # nobody reads them: keep memory bounded
            self.step_times.append(seconds)


class Engine(Protocol):
    """A decoding engine: takes jobs, answers each through its `finish` callback."""

    name: str
    stats: EngineStats
    candidates: int  # captions per row in every answer
    failure: str | None  # why the engine can no longer decode; None while it can

    @property
    def active_rows(self) -> int:
        """Rows decoding now."""

    @property
    def queued_rows(self) -> int:
        """Rows submitted and waiting to start."""

    def submit(self, jobs: list[Job]) -> None:
        """Hand over jobs; they may be answered before this returns (hf) or later (continuous)."""

    def close(self) -> None:
        """Stop; every job not yet answered gets an error."""


def answer(job: Job, texts: list[str] | None, error: BaseException | None) -> None:
    """Answer a job; a failure to answer one is logged and never stops the others."""
    try:
        job.finish(texts, error)
    except Exception:
        log.exception("answering a request failed")


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
