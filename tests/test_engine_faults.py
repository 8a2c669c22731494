"""The engines under faults, provoked at the decoder seam: failures stay with their jobs, a broken engine says so.

The faults (a step that raises once or forever, a prefill that runs out of memory, a loop that
dies) replace methods of the engine's own RunningBatch: none of them can be caused for real on
a CPU, and everything around them is the real engine.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from embcap.engines import Cancelled, EngineFailed, Job, Overloaded, create_engine, generate_blocking
from embcap.engines.continuous.engine import ContinuousEngine
from embcap.engines.metrics import COUNTERS, GAUGES, STEP_HISTOGRAM, EngineMetrics
from embcap.generation import CaptionGenerator
from test_engines import load, random_prefix


class Answers:
    """Collects each job's answer; `wait()` until all have one."""

    def __init__(self) -> None:
        self.answers: dict[int, tuple] = {}
        self.done = threading.Condition()

    def job(self, key: int, prefix: np.ndarray) -> Job:
        def finish(texts, error):
            with self.done:
                self.answers[key] = (texts, error)
                self.done.notify_all()

        return Job(prefix, finish)

    def wait(self, count: int, timeout_s: float = 60) -> dict[int, tuple]:
        with self.done:
            assert self.done.wait_for(lambda: len(self.answers) >= count, timeout_s), self.answers
            return dict(self.answers)


@pytest.fixture(scope="module")
def slowish(tiny_checkpoint) -> CaptionGenerator:
    return load(tiny_checkpoint, max_new_tokens=60, min_new_tokens=60)


def fail_steps(engine: ContinuousEngine, times: int | None, error=RuntimeError("injected step failure")) -> list:
    """Make the next `times` steps (None: every step) raise `error`; returns the list of failed calls."""
    real, calls = engine.batch.step, []

    def step():
        if times is None or len(calls) < times:
            calls.append(1)
            raise error
        return real()

    engine.batch.step = step
    return calls


def test_a_step_that_fails_once_fails_its_rows_only_and_the_engine_goes_on(slowish):
    engine = create_engine("continuous", slowish, slots=4)
    try:
        answers = Answers()
        calls = fail_steps(engine, 1)
        engine.submit([answers.job(0, random_prefix(slowish, 2))])
        assert answers.wait(1)[0][1].args == ("injected step failure",)
        assert len(calls) == 1 and engine.failure is None and engine.batch.active == 0
        assert len(generate_blocking(engine, random_prefix(slowish, 3), timeout_s=60)) == 3
        assert engine.stats.failed_steps == 1
    finally:
        engine.close()


def test_steps_that_keep_failing_end_the_engine_and_every_request_is_answered(slowish):
    reasons = []
    engine = ContinuousEngine(slowish, slots=2, on_failure=reasons.append, failure_limit=3)
    try:
        answers = Answers()
        fail_steps(engine, None, RuntimeError("CUDA error: an illegal memory access was encountered"))
        for key in range(4):  # two run (and fail), two wait in the backlog
            engine.submit([answers.job(key, random_prefix(slowish, 1, seed=key))])
            time.sleep(0.05)
        got = answers.wait(4)
        assert all(texts is None and error is not None for texts, error in got.values())
        assert engine.failure is not None and "3 decode steps failed in a row" in engine.failure
        assert "illegal memory access" in engine.failure
        assert reasons == [engine.failure], "the model is told once, with the reason"
        started = time.monotonic()
        with pytest.raises(EngineFailed, match="failed in a row"):
            generate_blocking(engine, random_prefix(slowish, 1), timeout_s=5)
        assert time.monotonic() - started < 1, "a failed engine answers at once"
    finally:
        engine.close()


def test_a_failed_admission_fails_only_the_joining_request(slowish):
    engine = create_engine("continuous", slowish, slots=4)
    try:
        answers = Answers()
        engine.submit([answers.job(0, random_prefix(slowish, 2, seed=1))])
        deadline = time.monotonic() + 10
        while engine.batch.active < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        real_add = engine.batch.add

        def out_of_memory(prefix, keys):
            engine.batch.add = real_add
            raise MemoryError("could not allocate the joining rows")

        engine.batch.add = out_of_memory
        engine.submit([answers.job(1, random_prefix(slowish, 1, seed=2))])
        got = answers.wait(2)
        assert isinstance(got[1][1], MemoryError) and got[1][0] is None
        assert got[0][1] is None and len(got[0][0]) == 2, "the rows already decoding are not touched"
        assert engine.failure is None and engine.batch.active == 0
        assert len(generate_blocking(engine, random_prefix(slowish, 2), timeout_s=60)) == 2
    finally:
        engine.close()


def test_a_dead_loop_is_a_failed_engine_not_a_hang(tiny_checkpoint):
    slowish = load(tiny_checkpoint, max_new_tokens=4000, min_new_tokens=4000)
    engine = create_engine("continuous", slowish, slots=4, on_failure=lambda reason: None)
    try:
        def broken_drop(keys):
            raise RuntimeError("CUDA error: device-side assert triggered")

        engine.batch.drop = broken_drop  # reached outside the step, when a request is past its deadline
        engine.timeout_s = 0.2
        with pytest.raises((EngineFailed, Cancelled)):
            generate_blocking(engine, random_prefix(slowish, 2), timeout_s=30)
        deadline = time.monotonic() + 10
        while engine.failure is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.failure.startswith("the decode loop died: RuntimeError: CUDA error")
        assert not engine._thread.is_alive()
        with pytest.raises(EngineFailed):
            generate_blocking(engine, random_prefix(slowish, 1), timeout_s=5)
    finally:
        engine.close()


def test_close_answers_every_request_queued_or_running(slowish):
    engine = create_engine("continuous", slowish, slots=2)
    answers = Answers()
    real_step = engine.batch.step

    def slow_step():
        time.sleep(0.05)
        real_step()

    engine.batch.step = slow_step
    for key in range(5):
        engine.submit([answers.job(key, random_prefix(slowish, 1, seed=key))])
    time.sleep(0.2)
    engine.close()
    got = answers.wait(5, timeout_s=5)
    assert sorted(got) == [0, 1, 2, 3, 4]
    assert engine.queued_rows == 0


def test_a_full_backlog_refuses_at_once(slowish):
    engine = create_engine("continuous", slowish, slots=1, max_queued_rows=2)
    try:
        answers = Answers()
        engine.batch.step = lambda: time.sleep(0.05)  # nothing finishes while the backlog fills
        engine.submit([answers.job(0, random_prefix(slowish, 1))])
        time.sleep(0.2)  # job 0 is decoding; 2 rows may wait
        engine.submit([answers.job(1, random_prefix(slowish, 1)), answers.job(2, random_prefix(slowish, 1))])
        started = time.monotonic()
        engine.submit([answers.job(3, random_prefix(slowish, 1))])
        got = answers.wait(1)
        assert isinstance(got[3][1], Overloaded) and time.monotonic() - started < 0.5
        assert engine.queued_rows == 2 and engine.stats.refused_rows == 1
    finally:
        engine.close()


@pytest.mark.parametrize("engine_name", ["continuous", "hf"])
def test_one_answer_that_fails_to_send_leaves_the_others_answered(slowish, engine_name):
    engine = create_engine(engine_name, slowish, slots=4)
    try:
        answers = Answers()

        def broken(texts, error):
            raise ConnectionError("the client's stream is gone")

        engine.submit([Job(random_prefix(slowish, 1), broken), answers.job(1, random_prefix(slowish, 1, seed=3))])
        assert answers.wait(1)[1][1] is None
    finally:
        engine.close()


class RecordingFactory:
    """A metrics factory that records every update (the stub's is pb_utils.MetricFamily)."""

    def __init__(self) -> None:
        self.values: dict[str, list] = {}

    def _metric(self, name):
        values = self.values.setdefault(name, [])

        class Metric:
            increment = set = observe = values.append

        return Metric()

    def counter(self, name, description, labels):
        return self._metric(name)

    gauge = counter

    def histogram(self, name, description, labels, buckets):
        assert list(buckets) == sorted(buckets)
        return self._metric(name)


def test_engine_metrics_report_counters_gauges_and_step_times(slowish):
    engine = create_engine("continuous", slowish, slots=4)
    factory = RecordingFactory()
    metrics = EngineMetrics(engine, factory, {"engine": "continuous"}, interval_s=0.05).start()
    try:
        generate_blocking(engine, random_prefix(slowish, 3), timeout_s=60)
        time.sleep(0.2)
    finally:
        metrics.stop()
        engine.close()
    steps, rows = (factory.values[COUNTERS[field][0]] for field in ("steps", "step_rows"))
    assert sum(steps) == engine.stats.steps >= 59 and sum(rows) == engine.stats.step_rows >= 3 * 59
    assert sum(factory.values[COUNTERS["admitted_jobs"][0]]) == 1
    assert len(factory.values[STEP_HISTOGRAM[0]]) == engine.stats.steps
    assert all(value > 0 for value in factory.values[STEP_HISTOGRAM[0]])
    assert factory.values[GAUGES["active_rows"][0]][-1] == 0
    assert max(factory.values[GAUGES["active_rows"][0]]) <= 3


def test_rows_that_cannot_be_answered_before_the_deadline_are_refused_at_once(slowish):
    engine = create_engine("continuous", slowish, slots=1, timeout_s=2.0)
    try:
        generate_blocking(engine, random_prefix(slowish, 1), timeout_s=60)  # steps per request, measured
        rate = engine.profile.rows_per_s(1)  # the batch holds one row
        answers = Answers()
        ahead = int(rate * 2.0) + 2  # more rows than the engine answers in the 2 s deadline
        for key in range(ahead):
            engine.submit([answers.job(key, random_prefix(slowish, 1, seed=key))])
        started = time.monotonic()
        engine.submit([answers.job(ahead, random_prefix(slowish, 1))])
        refused = answers.wait(1)
        assert isinstance(refused[ahead][1], Overloaded), refused
        assert "past the 2 s deadline" in str(refused[ahead][1]) and time.monotonic() - started < 0.5
        got = answers.wait(ahead + 1)
        assert all(error is None or isinstance(error, (Cancelled, Overloaded)) for _, error in got.values())
    finally:
        engine.close()


def test_the_gateway_answers_an_engine_refusal_as_over_capacity():
    from tritonclient.utils import InferenceServerException

    from embcap.contract import OVERLOAD_MARK
    from gateway.triton_client import backend_error

    refused = InferenceServerException(f"in ensemble 'captioner', decoder failed: {OVERLOAD_MARK} 9 rows are "
                                       "already waiting (limit 8); try again shortly", status="StatusCode.UNAVAILABLE")
    error = backend_error(refused, "inference")
    assert (error.status, error.code) == (503, "over_capacity") and "9 rows are already waiting" in error.message
    down = backend_error(InferenceServerException("connection refused", status="StatusCode.UNAVAILABLE"), "health")
    assert (down.status, down.code) == (503, "triton_unavailable")


def test_the_gateway_answers_the_engines_deadline_as_too_slow():
    """Before: when the engine's deadline fired before the gateway's gRPC deadline, the client got 502."""
    from tritonclient.utils import InferenceServerException

    from embcap.contract import DEADLINE_MARK
    from gateway.triton_client import backend_error

    late = InferenceServerException(f"in ensemble 'captioner', decoder failed: {DEADLINE_MARK} 1 s while decoding",
                                    status="StatusCode.INTERNAL")
    assert (backend_error(late, "inference").status, backend_error(late, "inference").code) == (504, "triton_timeout")
    broken = InferenceServerException("decoder failed: CUDA error", status="StatusCode.INTERNAL")
    assert backend_error(broken, "inference").status == 502


def test_a_request_past_its_deadline_while_decoding_is_answered_with_the_mark(tiny_checkpoint):
    from embcap.contract import DEADLINE_MARK

    endless = load(tiny_checkpoint, max_new_tokens=4000, min_new_tokens=4000)
    engine = create_engine("continuous", endless, slots=1, timeout_s=0.5)
    try:
        answers = Answers()
        engine.submit([answers.job(0, random_prefix(endless, 1))])
        (_, error), = answers.wait(1).values()
        assert isinstance(error, Cancelled) and str(error).startswith(DEADLINE_MARK), error
    finally:
        engine.close()
