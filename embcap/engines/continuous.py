"""The continuous engine: one background loop decodes all rows of all requests, step by step.

`submit()` only queues jobs. The loop admits queued jobs whenever the running
batch has room for all of a job's rows (first come, first served), runs one
decode step, and answers each job as soon as its own rows are done. Requests
that arrive while others decode join at the next step instead of waiting for the
whole batch, and short captions leave without waiting for long ones. A job whose
`cancelled()` turns true, or that is still unanswered after the request deadline
(embcap.deadlines), is answered with Cancelled and its rows leave the batch.

With N candidates per row (best-of-N), each of a job's rows takes N slots of the running
batch (its prompt prefilled once, see embcap.running_batch); the job is admitted when all
its rows x N slots are free, and answered with rows x N captions, row by row.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from embcap.deadlines import request_timeout_s
from embcap.candidates import candidate_plan
from embcap.engines.base import Cancelled, EngineStats, Job
from embcap.generation import BLANK_FALLBACK, CaptionGenerator
from embcap.running_batch import RunningBatch

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    job: Job
    texts: list[str | None]
    left: int
    deadline: float


class ContinuousEngine:
    """Iteration-level batching of up to `slots` rows (each `candidates` slots of a `RunningBatch`),
    driven by its own thread."""

    name = "continuous"

    def __init__(self, generator: CaptionGenerator, slots: int, use_graphs: bool | None = None,
                 timeout_s: float | None = None, cancel_poll_s: float = 1.0, candidates: int = 1) -> None:
        plan = candidate_plan(generator.spec, candidates)
        self.candidates = plan.count
        self.batch = RunningBatch(generator, slots * plan.count, use_graphs, plan)
        self.stats = EngineStats()
        self.timeout_s = request_timeout_s() if timeout_s is None else timeout_s
        self.cancel_poll_s = cancel_poll_s
        self._inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._backlog: collections.deque[Job] = collections.deque()
        self._pending: dict[int, _Pending] = {}
        self._numbers = iter(range(1 << 62))
        self._thread = threading.Thread(target=self._loop, name="continuous-engine", daemon=True)
        self._thread.start()

    @property
    def capture_seconds(self) -> float:
        """Time spent capturing CUDA graphs at start-up (0 on the CPU)."""
        return self.batch.decoder.capture_seconds

    @property
    def capacity(self) -> int:
        """Rows that decode at once (each takes `candidates` slots)."""
        return self.batch.capacity // self.candidates

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs for the loop; a job with more rows than the batch holds fails at once."""
        for job in jobs:
            if job.rows > self.capacity:
                job.finish(None, ValueError(f"{job.rows} rows exceed the engine's {self.capacity} rows "
                                            f"({self.batch.capacity} slots, {self.candidates} per row)"))
            elif job.rows == 0:
                job.finish([], None)
            else:
                self._inbox.put(job)

    def close(self) -> None:
        """Stop the loop; unanswered jobs get an error."""
        self._stopping.set()
        self._inbox.put(None)
        self._thread.join(timeout=30)
        self._fail_all(RuntimeError("the decoder is shutting down"))

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        last_poll = time.monotonic()
        while not self._stopping.is_set():
            self._collect()
            try:
                self._admit()
                self.batch.step()
                self._answer_finished()
            except Exception as exc:  # a broken step fails the requests in flight, not the loop
                log.exception("decode step failed")
                self._fail_all(exc, backlog=False)
            # Deadlines cost nothing to check; asking whether a client went away is a round trip
            # to the Triton server per request, so that is asked only every `cancel_poll_s`.
            poll = time.monotonic() - last_poll >= self.cancel_poll_s
            self._drop_cancelled(ask_clients=poll)
            if poll:
                last_poll = time.monotonic()

    def _collect(self) -> None:
        """Move newly submitted jobs to the backlog; block briefly only when there is nothing to do."""
        idle = not self.batch.active and not self._backlog
        try:
            job = self._inbox.get(timeout=0.1) if idle else self._inbox.get_nowait()
            while True:
                if job is not None:
                    self._backlog.append(job)
                job = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _admit(self) -> None:
        """Join backlog jobs (first come, first served) while all of a job's rows fit."""
        prefixes, keys = [], []
        room = self.batch.free_slots // self.candidates
        while self._backlog and self._backlog[0].rows <= room:
            job = self._backlog.popleft()
            number = next(self._numbers)
            texts = job.rows * self.candidates
            self._pending[number] = _Pending(job, [None] * texts, texts, job.created + self.timeout_s)
            keys += [(number, index) for index in range(texts)]
            prefixes.append(job.prefix)
            room -= job.rows
        if prefixes:
            self.batch.add(np.concatenate(prefixes), keys)

    def _answer_finished(self) -> None:
        for row in self.batch.take_finished():
            number, index = row.key
            entry = self._pending[number]
            entry.texts[index] = row.text
            entry.left -= 1
            if row.fallback:
                self.stats.blank_fallbacks += 1
                log.warning("a row stayed blank up to max_new_tokens: answered %r", BLANK_FALLBACK)
            if entry.left == 0:
                del self._pending[number]
                self._finish(entry.job, entry.texts, None)

    def _drop_cancelled(self, ask_clients: bool) -> None:
        """Answer and forget jobs past their deadline (or, with `ask_clients`, whose client went away)."""
        now = time.monotonic()
        for job in [job for job in self._backlog
                    if now > job.created + self.timeout_s or (ask_clients and self._is_cancelled(job))]:
            self._backlog.remove(job)
            self._finish(job, None, Cancelled("request cancelled or timed out before it started"))
        cancelled = [number for number, entry in self._pending.items()
                     if now > entry.deadline or (ask_clients and self._is_cancelled(entry.job))]
        if not cancelled:
            return
        keys = {(number, index) for number in cancelled for index in range(len(self._pending[number].texts))}
        self.stats.cancelled_rows += self.batch.drop(keys)
        for number in cancelled:
            self._finish(self._pending.pop(number).job, None,
                         Cancelled(f"request cancelled or past its {self.timeout_s:g} s deadline while decoding"))

    def _fail_all(self, error: BaseException, backlog: bool = True) -> None:
        self.batch.drop({(number, index) for number, entry in self._pending.items()
                         for index in range(len(entry.texts))})
        for entry in self._pending.values():
            self._finish(entry.job, None, error)
        self._pending.clear()
        while backlog and self._backlog:
            self._finish(self._backlog.popleft(), None, error)

    @staticmethod
    def _is_cancelled(job: Job) -> bool:
        try:
            return bool(job.cancelled())
        except Exception:  # a request whose state cannot be read is treated as alive
            return False

    @staticmethod
    def _finish(job: Job, texts: list[str] | None, error: BaseException | None) -> None:
        try:
            job.finish(texts, error)
        except Exception:
            log.exception("answering a request failed")
