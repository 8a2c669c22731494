"""Admission judges a queue by how full the batch will be: the decoder's load profile, measured by the engine,
used by the engine and by server.py's gateway; true overload is still refused at once."""

from __future__ import annotations

import glob
import json
import threading
import time

import httpx
import numpy as np
import pytest

from conftest import start_server, stop_process, triton_shm_prefix
from embcap.engines import create_engine, generate_blocking
from embcap.load_profile import LoadProfile
from gateway.admission import Admission, OverCapacity
from test_engines import load, random_prefix

# Shaped like the default decoder's on this project's 2-core host: 54 ms per step for 1 slot, 108 ms for 4,
# 530 ms for 64; a 4-row request of evaluator-shaped rows takes 15 steps on average, 31 at most.
CPU_LIKE = LoadProfile(capacity=64, candidates=1, step_s=((1, 0.054), (4, 0.108), (64, 0.53)),
                       steps_per_request=15, steps_longest=31)


def test_a_step_costs_what_was_measured_at_that_batch_size():
    assert CPU_LIKE.step_seconds(4) == pytest.approx(0.108)
    assert CPU_LIKE.step_seconds(34) == pytest.approx(0.108 + (0.53 - 0.108) / 2)  # between two measurements
    assert CPU_LIKE.step_seconds(124) == pytest.approx(0.53 + (0.53 - 0.108))  # beyond: along the last line
    flat = LoadProfile(8, 1, ((1, 0.02), (8, 0.01)), 10, 10)  # noise made the larger batch faster
    assert flat.step_seconds(64) == pytest.approx(0.01)  # never below the largest measured
    assert LoadProfile(8, 1, ((2, 0.02),), 10, 10).step_seconds(8) == pytest.approx(0.08)  # one point: proportional


def test_the_estimate_depends_on_how_full_the_batch_will_be():
    lone = CPU_LIKE.seconds_to_answer(0, 4)
    assert lone == pytest.approx(15.5 * 0.108)  # its own steps: at least half the longest
    full = CPU_LIKE.seconds_to_answer(60, 4)  # 16 requests of 4 rows: one full batch
    assert full == pytest.approx(15.5 * 0.53)
    assert full < 16 * lone / 3  # a lone request's rate applied to the full batch: 3.3x too slow here
    assert CPU_LIKE.seconds_to_answer(0, 4, rows_behind=60) == pytest.approx(full)  # arrivals fill its batch
    # a batch-full ahead of it must leave first: a request's mean steps, then its own
    assert CPU_LIKE.seconds_to_answer(124, 4) == pytest.approx((15 + 15.5) * 0.53)
    best_of_16 = LoadProfile(64, 16, ((16, 0.25), (64, 0.53), (1024, 7.3)), 15, 31)
    assert best_of_16.seconds_to_answer(0, 4) == pytest.approx(15.5 * 0.53)  # 4 rows x 16 candidates = 64 slots


def test_a_profile_travels_as_json_and_a_broken_one_is_refused():
    assert LoadProfile.from_json(CPU_LIKE.to_json()) == CPU_LIKE
    steps = '"steps_per_request": 3, "steps_longest": 4'
    for text in ("", "{}", '{"capacity": 4, "candidates": 1, "step_s": [], %s}' % steps,
                 '{"capacity": 4, "candidates": 1, "step_s": [[4, 0.1], [1, 0.2]], %s}' % steps,
                 '{"capacity": 4, "candidates": 1, "step_s": [[1, "nan"]], %s}' % steps,
                 '{"capacity": 4, "candidates": 1, "step_s": [[1, 0.1]], "steps_per_request": 5, "steps_longest": 4}'):
        with pytest.raises(ValueError, match="load profile|ascending"):
            LoadProfile.from_json(text)
    two = CPU_LIKE.scaled(2)  # two engines share the requests
    assert two.seconds_to_answer(124, 4) == pytest.approx(CPU_LIKE.seconds_to_answer(60, 4))


def test_the_gateway_admits_the_burst_a_lone_requests_rate_would_refuse():
    """Before: one 4-row request measured ~0.9 rows/s, and 60 queued rows were judged at that rate (~70 s)."""
    clock = [0.0]
    rate_only = Admission(deadline_s=55.0, clock=lambda: clock[0])
    profiled = Admission(deadline_s=55.0, clock=lambda: clock[0], profile_source=lambda: CPU_LIKE)
    for admission in (rate_only, profiled):
        admission.started(4)  # the warm-up request, alone: 4 rows in 4.4 s
        clock[0] += 4.4
        admission.finished(4, answered=True)
        for _ in range(15):  # 15 of the burst's 16 requests are in flight
            admission.started(4)
    assert not rate_only.decide(4).admit
    decision = profiled.check(4)
    assert decision.admit and decision.expected_s == pytest.approx(15.5 * 0.53)
    for _ in range(200):  # true overload: 860 rows ahead, more than 13 batches-full
        profiled.started(4)
    with pytest.raises(OverCapacity, match="with the batch that full the decoder answers .* past the 55 s deadline"):
        profiled.check(4)


def test_requests_still_arriving_count_for_the_batch_they_will_fill():
    admission = Admission(deadline_s=55.0, profile_source=lambda: CPU_LIKE)
    for _ in range(16):  # 16 requests arrive at once; none handed to Triton yet
        admission.entered()
    assert admission.estimate_s(4) == pytest.approx(15.5 * 0.53)
    admission.started(4)  # one was handed to Triton (it stays in the handler until answered)
    assert admission.estimate_s(4) == pytest.approx(15.5 * 0.53)  # 4 rows ahead, 14 requests beside it


def test_the_engine_measures_its_profile_and_refuses_with_it(tiny_checkpoint):
    generator = load(tiny_checkpoint)
    published = []
    engine = create_engine("continuous", generator, slots=8, on_profile=published.append)
    try:
        profile = engine.profile
        assert [slots for slots, _ in profile.step_s] == [1, 8]  # timed at start-up: one row, all 8
        assert profile.steps_per_request == profile.steps_longest == generator.spec.generation.max_new_tokens
        for _ in range(3):
            generate_blocking(engine, random_prefix(generator, 4), timeout_s=60)
        measured = engine.profile
        assert measured.steps_per_request <= measured.steps_longest <= generator.spec.generation.max_new_tokens
        assert published and published[-1].capacity == 8
        engine.close()  # the profile stops changing
        assert engine.estimated_wait_s(8) == engine.profile.seconds_to_answer(0, 8)
    finally:
        engine.close()


def test_server_py_judges_its_queue_with_the_engines_profile(tiny_checkpoint, tmp_path):
    """The decoder publishes its profile; the gateway's estimates use it; true overload is refused with it."""
    deadline_s = 3.0
    process, base = start_server(tiny_checkpoint, tmp_path, ready_timeout_s=180,
                                 env={"EMBCAP_REQUEST_TIMEOUT_S": str(deadline_s)})
    try:
        prefix = triton_shm_prefix(process.pid)
        [published] = glob.glob(f"/tmp/{prefix}tmp_*/embcap-engine-profile-decoder-*.json")
        profile = LoadProfile.from_json(open(published).read())
        assert profile.capacity == 64 and profile.candidates == 1  # the export's defaults for the tiny model
        rows = np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)
        assert httpx.post(base + "/api/v1/inference", json={"embedding": rows[:4].ravel().tolist()},
                          headers={"X-Request-ID": "lone"}, timeout=60).status_code == 200
        body = json.dumps({"embedding": rows.ravel().tolist()})
        results: list[tuple[int, float, str]] = []

        def send() -> None:
            started = time.monotonic()
            answer = httpx.post(base + "/api/v1/inference", content=body, timeout=60,
                                headers={"content-type": "application/json"})
            results.append((answer.status_code, time.monotonic() - started, answer.text))

        burst = [threading.Thread(target=send) for _ in range(32)]  # 2048 rows: 32 batches-full
        for thread in burst:
            thread.start()
        for thread in burst:
            thread.join(90)
        # How soon a refusal comes, and that the admitted are answered in time, is tests/test_hostile.py's (the
        # same arithmetic once a profile is given): here the 32 bodies of 64 rows queue for one parse thread, and
        # the first, admitted with nothing queued, decodes beside that parsing, which on a loaded 2-core host
        # can take the 3 s by themselves.
        assert {status for status, _, _ in results} <= {200, 503, 504}, results
        refused = [text for status, _, text in results if status == 503]
        assert refused and all("with the batch that full the decoder answers" in text for text in refused), refused
    finally:
        assert stop_process(process) == 0
    served = [json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines()
              if line.startswith("{") and '"request served"' in line]
    lone = next(entry for entry in served if entry.get("request_id") == "lone")
    assert lone["expected_s"] > 0  # every admitted request is logged with its estimate


def test_the_admission_bench_reports_refusals_and_each_admitted_requests_prediction(tiny_checkpoint, tmp_path):
    from bench import admission as bench_admission

    out = tmp_path / "bench"
    assert bench_admission.main(["--checkpoint", str(tiny_checkpoint), "--runs", "1", "--clients", "2",
                                 "--requests", "2", "--warm-requests", "2", "--level-requests", "2",
                                 "--out", str(out)]) == 0
    results = json.loads((out / "admission.json").read_text())
    [burst] = results["bursts"]
    assert burst["requests"] == 4 and burst["refused"] + burst["other_errors"] == 0
    assert [level["concurrency"] for level in results["levels"]] == list(bench_admission.LEVELS)
    for level in results["levels"]:  # every admitted request was found in the log with its estimate
        assert level["predicted_requests"] == 2 * level["concurrency"] and level["ratio_min"] > 0, level
    report = (out / "admission.md").read_text()
    assert "| run | refused |" in report and "predicted/actual min" in report
    assert not (out / "model_repository").exists()
