"""The continuous engine: one background loop decodes all rows of all requests, step by step.

`submit()` only queues jobs. The loop admits queued jobs whenever the running
batch has room for all of a job's rows (first come, first served), runs one
decode step, and answers each job as soon as its own rows are done. Requests
that arrive while others decode join at the next step instead of waiting for the
whole batch, and short captions leave without waiting for long ones. A job whose
`cancelled()` turns true, or that is still unanswered after the request deadline
(embcap.deadlines), is answered with Cancelled and its rows leave the batch.

With N candidates per row (best-of-N), each of a job's rows takes N slots of the running
batch (its prompt prefilled once, see embcap.engines.continuous.running_batch); the job is admitted when all
its rows x N slots are free, and answered with rows x N captions, row by row.

Failures stay with the jobs they belong to: a failed admission (a prefill that raises, out
of memory included) fails the joining jobs only; a failed step fails the rows decoding in
it and the loop goes on. Steps that keep failing (`failure_limit` in a row, as a sticky
CUDA error does) or a loop that dies make the engine failed for good: `failure` says why,
every job still waiting is answered with EngineFailed, later submissions fail at once,
and `on_failure` is told (the Triton model then has its process restarted).

Admission control: a request is refused at once with Overloaded, instead of waiting past its
deadline for a 504, when the rows ahead of it (decoding and queued) cannot be answered within
the request deadline, or when the backlog already holds `max_queued_rows`. The estimate depends
on how full the batch will be (embcap.load_profile): the engine times steps of a few batch sizes at
start-up, keeps measuring its step time at every batch size and the steps a
request takes, and hands that profile to `on_profile` every PUBLISH_INTERVAL_S (the Triton model
publishes it for the gateway's own admission).

Longer than 250 lines on purpose: admission, the step, cancellation and the failure paths all
act on the loop thread's own state, and together they must answer every job exactly once.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from embcap.candidates import candidate_plan
from embcap.contract import DEADLINE_MARK, OVERLOAD_MARK
from embcap.deadlines import request_timeout_s
from embcap.engines.base import Cancelled, EngineFailed, EngineStats, Job, Overloaded, answer
from embcap.generation import BLANK_FALLBACK, CaptionGenerator
from embcap.engines.continuous.load_meter import LoadMeter
from embcap.engines.continuous.running_batch import RunningBatch
from embcap.load_profile import LoadProfile

log = logging.getLogger(__name__)
FAILURE_LIMIT = 3  # consecutive failed steps that make the engine failed for good
PUBLISH_INTERVAL_S = 1.0  # how often the load profile goes to `on_profile`
PROFILE_REFRESH_S = 0.1  # how often the profile that admission reads is recomputed from the measurements
CALIBRATION_SLOTS = 64  # the start-up's larger timed step (without CUDA graphs; with them, every captured size)


@dataclass
class _Pending:
    job: Job
    texts: list[str | None]
    left: int
    deadline: float
    admitted_step: int  # the engine's step count when it joined the batch


class ContinuousEngine:
    """Iteration-level batching of up to `slots` rows (each `candidates` slots of a `RunningBatch`),
    driven by its own thread."""

    name = "continuous"

    def __init__(self, generator: CaptionGenerator, slots: int, use_graphs: bool | None = None,
                 timeout_s: float | None = None, cancel_poll_s: float = 1.0, candidates: int = 1,
                 max_queued_rows: int | None = None, failure_limit: int = FAILURE_LIMIT,
                 on_failure: Callable[[str], None] | None = None, attention_backend: str = "auto",
                 on_profile: Callable[[LoadProfile], None] | None = None) -> None:
        plan = candidate_plan(generator.spec, candidates)
        self.candidates = plan.count
        self.batch = RunningBatch(generator, slots * plan.count, use_graphs, plan, attention_backend)
        self.device = self.batch.decoder.device
        self.stats = EngineStats()
        self.timeout_s = request_timeout_s() if timeout_s is None else timeout_s
        self.cancel_poll_s = cancel_poll_s
        self.max_queued_rows = max_queued_rows
        self.failure_limit = failure_limit
        self.on_failure = on_failure
        self.failure: str | None = None
        self._inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._queued = 0  # rows in the inbox and the backlog
        self._queued_lock = threading.Lock()
        self._stopping = threading.Event()
        self._backlog: collections.deque[Job] = collections.deque()
        self._pending: dict[int, _Pending] = {}
        self._numbers = iter(range(1 << 62))
        self._failed_in_a_row = 0
        self.meter = LoadMeter(self.capacity, self.candidates, self.batch.buckets, self._calibrate(),
                               generator.spec.generation.max_new_tokens)
        self.profile: LoadProfile | None = self.meter.profile()  # replaced, never changed: any thread reads it
        self.on_profile = on_profile
        self._published = self._profiled = 0.0
        self._unpublished = False  # the profile changed since it was last handed to `on_profile`
        self._thread = threading.Thread(target=self._loop, name="continuous-engine", daemon=True)
        self._thread.start()

    def _calibrate(self) -> dict[int, float]:
        """Seconds per step at a few batch sizes, before any row joins: every captured size where a step is a
        CUDA graph (a replay costs milliseconds); else one row's slots and CALIBRATION_SLOTS (at least four
        rows'), the costlier sizes following the line through them until they are measured."""
        buckets = self.batch.buckets
        sizes = set(buckets) if self.batch.decoder.use_graphs else {
            next(b for b in buckets if b >= slots) for slots in
            (self.candidates, min(self.batch.capacity, max(CALIBRATION_SLOTS, 4 * self.candidates)))}
        return {size: self.batch.decoder.time_step(size) for size in sorted(sizes)}

    @property
    def capture_seconds(self) -> float:
        """Time spent capturing CUDA graphs at start-up (0 on the CPU)."""
        return self.batch.decoder.capture_seconds

    @property
    def capacity(self) -> int:
        """Rows that decode at once (each takes `candidates` slots)."""
        return self.batch.capacity // self.candidates

    @property
    def active_rows(self) -> int:
        return self.batch.active // self.candidates

    @property
    def queued_rows(self) -> int:
        return self._queued

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs for the loop; a job that cannot be served (too many rows, a full backlog, a failed
        engine) is answered at once."""
        for job in jobs:
            if self.failure is not None:
                answer(job, None, EngineFailed(self.failure))
            elif job.rows > self.capacity:
                answer(job, None, ValueError(f"{job.rows} rows exceed the engine's {self.capacity} rows "
                                             f"({self.batch.capacity} slots, {self.candidates} per row)"))
            elif job.rows == 0:
                answer(job, [], None)
            else:
                refusal = self._reserve(job.rows)
                if refusal is None:
                    self._inbox.put(job)
                else:
                    self.stats.refused_rows += job.rows
                    answer(job, None, Overloaded(refusal))

    def estimated_wait_s(self, rows: int = 1) -> float | None:
        """Seconds until `rows` more rows would be answered behind those decoding and queued (None: nothing
        measured yet)."""
        profile = self.profile
        return None if profile is None else profile.seconds_to_answer(self.active_rows + self._queued, rows)

    def _reserve(self, rows: int) -> str | None:
        """Count `rows` as queued, or say why they are refused."""
        with self._queued_lock:
            if self.max_queued_rows is not None and self._queued + rows > self.max_queued_rows:
                return (f"{OVERLOAD_MARK} {self._queued} rows are already waiting (limit {self.max_queued_rows}); "
                        "try again shortly")
            wait = self.estimated_wait_s(rows)
            if wait is not None and wait > self.timeout_s and self._queued > 0:
                ahead = self.active_rows + self._queued
                return (f"{OVERLOAD_MARK} {ahead} rows are ahead; with the batch that full the decoder answers "
                        f"{self.profile.rows_per_s(ahead + rows):.2f} rows/s: about {wait:.0f} s, past the "
                        f"{self.timeout_s:g} s deadline; try again shortly")
            self._queued += rows
            return None

    def _release(self, rows: int) -> None:
        with self._queued_lock:
            self._queued -= rows

    def close(self) -> None:
        """Stop the loop; every job not yet answered (running, in the backlog or still in the inbox) gets an error."""
        self._stopping.set()
        self._inbox.put(None)
        self._thread.join(timeout=30)
        self._fail_everything(RuntimeError("the decoder is shutting down"))

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        try:
            if self.device.type == "cuda":  # the current device is per thread: this one runs every step
                import torch

                torch.cuda.set_device(self.device)
            last_poll = time.monotonic()
            self._publish(force=True)
            while not self._stopping.is_set():
                self._collect()
                started = time.perf_counter()
                self._admit()
                slots = self.batch.active
                self._step()
                # Deadlines cost nothing to check; asking whether a client went away is a round trip
                # to the Triton server per request, so that is asked only every `cancel_poll_s`.
                poll = time.monotonic() - last_poll >= self.cancel_poll_s
                self._drop_cancelled(ask_clients=poll)
                if poll:
                    last_poll = time.monotonic()
                if slots:
                    self._measured(slots, time.perf_counter() - started)
                elif self._unpublished:  # idle: the last answers' figures go out now, not at the next request
                    self._publish(force=True)
        except BaseException as exc:  # noqa: BLE001 - whatever ends the loop ends the engine, with its reason
            self._fail_for_good(f"the decode loop died: {type(exc).__name__}: {exc}")

    def _measured(self, slots: int, seconds: float) -> None:
        """Count one iteration; refresh the profile every PROFILE_REFRESH_S and publish it."""
        self.meter.step(slots, seconds)
        now = time.monotonic()
        if now - self._profiled >= PROFILE_REFRESH_S:
            self._profiled = now
            self.profile = self.meter.profile()
            self._unpublished = True
            self._publish()

    def _publish(self, force: bool = False) -> None:
        """Hand the profile to `on_profile`, at most every PUBLISH_INTERVAL_S; a failure is logged, never raised."""
        now = time.monotonic()
        if self.on_profile is None or self.profile is None or (not force and now - self._published
                                                                < PUBLISH_INTERVAL_S):
            return
        self._published, self._unpublished = now, False
        try:
            self.on_profile(self.profile)
        except Exception:
            log.exception("publishing the load profile failed")

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
        """Join backlog jobs (first come, first served) while all of a job's rows fit; a failed prefill
        fails only the jobs that were joining."""
        joining: list[int] = []
        prefixes, keys = [], []
        room = self.batch.free_slots // self.candidates
        now = time.monotonic()
        while self._backlog and self._backlog[0].rows <= room:
            job = self._backlog.popleft()
            self._release(job.rows)
            number = next(self._numbers)
            texts = job.rows * self.candidates
            self._pending[number] = _Pending(job, [None] * texts, texts, job.created + self.timeout_s,
                                             self.stats.steps)
            keys += [(number, index) for index in range(texts)]
            prefixes.append(job.prefix)
            joining.append(number)
            room -= job.rows
            self.stats.admitted_jobs += 1
            self.stats.queue_wait_s += now - job.created
        if not prefixes:
            return
        active = self.batch.active
        try:
            self.batch.add(np.concatenate(prefixes), keys)
        except Exception as exc:
            log.exception("admitting %d request(s) failed", len(joining))
            self.stats.failed_steps += 1
            self.batch.forget_from(active)
            for number in joining:
                answer(self._pending.pop(number).job, None, exc)

    def _step(self) -> None:
        """One decode step; a failure fails the rows in it, and `failure_limit` failures in a row end the engine."""
        rows = self.batch.active
        if not rows:
            return
        started = time.perf_counter()
        try:
            self.batch.step()
            finished = self.batch.take_finished()
        except Exception as exc:
            log.exception("decode step failed")
            self.stats.failed_steps += 1
            self._failed_in_a_row += 1
            self._fail_running(exc)
            if self._failed_in_a_row >= self.failure_limit:
                raise EngineFailed(f"{self._failed_in_a_row} decode steps failed in a row, the last with "
                                   f"{type(exc).__name__}: {exc}") from exc
            return
        self._failed_in_a_row = 0
        self.stats.record_step(rows, time.perf_counter() - started)
        self._answer(finished)

    def _answer(self, finished) -> None:
        for row in finished:
            number, index = row.key
            entry = self._pending[number]
            entry.texts[index] = row.text
            entry.left -= 1
            if row.fallback:
                self.stats.blank_fallbacks += 1
                log.warning("a row stayed blank up to max_new_tokens: answered %r", BLANK_FALLBACK)
            if entry.left == 0:
                del self._pending[number]
                self.meter.answered(self.stats.steps - entry.admitted_step)
                self._profiled = 0.0  # refreshed after this step: admission sees the new figures at once
                answer(entry.job, entry.texts, None)

    def _drop_cancelled(self, ask_clients: bool) -> None:
        """Answer and forget jobs past their deadline (or, with `ask_clients`, whose client went away)."""
        now = time.monotonic()
        for job in [job for job in self._backlog
                    if now > job.created + self.timeout_s or (ask_clients and _is_cancelled(job))]:
            self._backlog.remove(job)
            self._release(job.rows)
            late = now > job.created + self.timeout_s
            answer(job, None, Cancelled(f"{DEADLINE_MARK} {self.timeout_s:g} s before the request started" if late
                                        else "request cancelled before it started"))
        cancelled = [number for number, entry in self._pending.items()
                     if now > entry.deadline or (ask_clients and _is_cancelled(entry.job))]
        if not cancelled:
            return
        keys = {(number, index) for number in cancelled for index in range(len(self._pending[number].texts))}
        self.stats.cancelled_rows += self.batch.drop(keys)
        for number in cancelled:
            entry = self._pending.pop(number)
            answer(entry.job, None, Cancelled(f"{DEADLINE_MARK} {self.timeout_s:g} s while decoding"
                                              if now > entry.deadline else "request cancelled while decoding"))

    # --------------------------------------------------------------- failures
    def _fail_running(self, error: BaseException) -> None:
        """Answer every decoding job with `error`; their rows leave without touching the device."""
        self.batch.forget_from(0)
        for entry in self._pending.values():
            answer(entry.job, None, error)
        self._pending.clear()

    def _fail_everything(self, error: BaseException) -> None:
        self._fail_running(error)
        while self._backlog:
            job = self._backlog.popleft()
            self._release(job.rows)
            answer(job, None, error)
        while True:
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._release(job.rows)
                answer(job, None, error)

    def _fail_for_good(self, reason: str) -> None:
        self.failure = reason
        log.error("continuous engine failed: %s", reason)
        self._fail_everything(EngineFailed(reason))
        if self.on_failure is not None:
            try:
                self.on_failure(reason)
            except Exception:
                log.exception("reporting the engine's failure failed")
        # A job submitted while the failure was being recorded may have reached the inbox just after it was
        # drained: answer it too (submit() refuses everything from now on).
        self._fail_everything(EngineFailed(reason))


def _is_cancelled(job: Job) -> bool:
    try:
        return bool(job.cancelled())
    except Exception:  # a request whose state cannot be read is treated as alive
        return False
