"""The benchmark code against a live stack (tiny checkpoint): well-formed reports, non-zero numbers.

No test here asserts a timing: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import psutil
import pytest

from bench import engine_report, loadgen, overhead, report
from bench.common import embedding_pool
from bench.plan import Plan, PlanError
from bench.run import run
from conftest import ROOT, positive, start_server, stop_process
from runtime.local import parse_port_range
from tooling import stats

SECTIONS = ("## Load: our stack", "## Triton direct (perf_analyzer", "## Offline limit", "## Targets",
            "## Machine and settings")


def grpc_url_of(process) -> str:
    args = list(process.args)
    return f"127.0.0.1:{args[args.index('--grpc-port') + 1]}"


@pytest.fixture(scope="module")
def tiny_stack(tiny_checkpoint, tmp_path_factory):
    process, base = start_server(tiny_checkpoint, tmp_path_factory.mktemp("bench_stack"), ready_timeout_s=180)
    yield base, grpc_url_of(process)
    stop_process(process)


def test_quick_run_against_a_live_stack_writes_a_well_formed_report(tiny_stack, tiny_checkpoint, tmp_path):
    base, grpc_url = tiny_stack
    plan = Plan.preset("quick", checkpoint=tiny_checkpoint, levels=[1, 4], pool_requests=8, gateway_url=base,
                       grpc_url=grpc_url, out=tmp_path / "run", pa_requests_per_level=4, skip={"engines", "candidates"},
                       overhead_requests=0)
    results = run(plan)

    for system in ("gateway", "baseline"):
        levels = results[system]
        assert [r["concurrency"] for r in levels] == [1, 4]
        for level in levels:
            assert level["errors"] == 0, level["error_samples"]
            assert level["ok"] == level["requests"] >= 1
            assert level["captions"] == 4 * level["ok"]
            for key in ("captions_per_s", "p50_ms", "p95_ms", "p99_ms"):
                assert positive(level[key]), (system, key, level)
            assert level["p50_ms"] <= level["p95_ms"] <= level["p99_ms"]
    # Triton's statistics were taken per level: every request reached the decoder
    stats = results["gateway"][1]["extra"]["triton"]["decoder"]
    assert stats["requests"] == results["gateway"][1]["ok"] and stats["mean_batch_rows"] >= 4

    (pa,) = results["perf_analyzer"]
    assert pa["concurrency"] == 1 and positive(pa["captions_per_s"]) and positive(pa["p50_ms"])
    offline = results["offline"]["results"]
    assert {1, 4, 16} <= {r["batch"] for r in offline}
    assert all(positive(r["captions_per_s"]) and positive(r["request_s"]) for r in offline)
    assert results["offline"]["generation"]["max_new_tokens"] == 8  # read from the checkpoint
    assert results["cold_start_s"] is None  # an external stack: not measured

    out = tmp_path / "run"
    assert json.loads((out / "results.json").read_text())["mode"] == "quick"
    text = (out / "report.md").read_text()
    for section in SECTIONS:
        assert section in text
    assert "| 1 |" in text and "| 4 |" in text and "OMP_WAIT_POLICY=PASSIVE" in text
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keys = {t["key"]: t for t in report.targets(results)}
    # A handful of requests: the verdict may be n/a (interval across 1.1x), but the interval is there.
    assert positive(keys["latency_c1"]["value"]) and "95% CI" in keys["latency_c1"]["detail"]
    # No paired samples in this run (overhead_requests=0): the overhead verdict is n/a.
    assert keys["gateway_overhead"]["met"] is None and "n/a" in keys["gateway_overhead"]["detail"]
    assert keys["throughput_c16"]["met"] is None  # level 16 not run: reported as n/a, not as a failure

    samples = overhead.measure(base, grpc_url, requests=4, warmup=1)  # paired per request, on the live stack
    assert len(samples["gateway_outside_ms"]) == len(samples["direct_outside_ms"]) == 4
    assert all(-50 < v < 5000 for v in samples["gateway_outside_ms"] + samples["direct_outside_ms"])
    keys = {t["key"]: t for t in report.targets(dict(results, overhead_paired=samples))}
    assert keys["gateway_overhead"]["detail"].startswith("paired per request over 4 + 4 requests")
    assert "overhead" in overhead.summary(samples)


def test_overhead_survives_a_gateway_that_closes_idle_connections(tiny_checkpoint, tmp_path):
    """Before: one kept connection, which the gateway closes once idle for EMBCAP_KEEP_ALIVE_S while the
    direct call runs; the next gateway request died with BrokenPipeError. Here the gateway closes every
    connection as soon as it has answered (keep-alive 0 s), so every request outlasts the timeout."""
    process, base = start_server(tiny_checkpoint, tmp_path, ready_timeout_s=180, env={"EMBCAP_KEEP_ALIVE_S": "0"})
    try:
        samples = overhead.measure(base, grpc_url_of(process), requests=4, warmup=1)
    finally:
        assert stop_process(process) == 0
    paths = ("gateway_outside_ms", "new_connection_outside_ms", "direct_outside_ms")
    assert [len(samples[path]) for path in paths] == [4, 4, 4]
    assert all(-50 < v < 5000 for path in paths for v in samples[path])
    assert samples["connection"] == "keep-alive" and samples["reconnects"] >= 1  # the closed one was reopened
    text = overhead.summary(samples)
    assert "reopened" in text and "a new connection per request (as the evaluator)" in text


def test_overhead_waits_for_requests_a_previous_load_left_in_triton(tiny_stack):
    """Before: requests still in Triton from the level before (their clients gone or not) were counted in the
    first paired sample and the phase failed with "another client is active"."""
    base, grpc_url = tiny_stack
    body = {"embedding": embedding_pool(1, 4, seed=3).reshape(-1).tolist()}
    with ThreadPoolExecutor(8) as pool:
        pending = [pool.submit(httpx.post, base + "/api/v1/inference", json=body, timeout=60) for _ in range(8)]
        samples = overhead.measure(base, grpc_url, requests=2, warmup=0)
    assert [future.result().status_code for future in pending] == [200] * 8
    assert samples["idle_wait_s"] >= 2.0 and len(samples["gateway_outside_ms"]) == 2


def test_a_failing_phase_keeps_the_other_phases_results_and_a_report(tiny_stack, tiny_checkpoint, tmp_path):
    """Before: a phase that raised ended the run with a traceback: no results.json, no report. Here the
    naive baseline cannot become healthy within the run's --ready-timeout-s (a real timeout)."""
    base, grpc_url = tiny_stack
    out = tmp_path / "run"
    command = [sys.executable, "-m", "bench", "run", "--mode", "quick", "--checkpoint", str(tiny_checkpoint),
               "--gateway-url", base, "--grpc-url", grpc_url, "--levels", "1", "--pool-requests", "4",
               "--overhead-requests", "2", "--ready-timeout-s", "0.2", "--out", str(out),
               *(f"--skip={name}" for name in ("perf_analyzer", "offline", "engines", "candidates"))]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 1, finished.stdout[-2000:] + finished.stderr[-2000:]
    assert "phase baseline: TimeoutError" in finished.stderr
    results = json.loads((out / "results.json").read_text())
    assert list(results["failed_phases"]) == ["baseline"]
    assert "did not answer 200 within" in results["failed_phases"]["baseline"]["error"]
    assert "TimeoutError" in (out / "logs" / "baseline.traceback").read_text()
    assert results["baseline"] == [] and results["gateway"][0]["ok"] >= 1  # the phase before it kept its level
    assert len(results["overhead_paired"]["gateway_outside_ms"]) == 2
    text = (out / "report.md").read_text()
    assert "## Failed phases" in text and "**baseline** failed" in text and "## Targets" in text
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    leftover = [p for p in psutil.process_iter(["cmdline"]) if "bench.baseline" in (p.info["cmdline"] or [])
                and str(tiny_checkpoint) in (p.info["cmdline"] or [])]
    assert leftover == []  # the baseline that never became healthy was stopped


def test_a_misspelt_engine_is_refused_before_any_phase_runs(tmp_path):
    """Before: the name failed only after the first engine's whole phase (~100 s)."""
    out = tmp_path / "run"
    started = time.monotonic()
    run_cli = subprocess.run([sys.executable, "-m", "bench", "run", "--mode", "quick", "--engines", "hf,contnuous",
                              "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run_cli.returncode == 2 and "unknown engine(s) 'contnuous'" in run_cli.stderr, run_cli.stderr
    assert "continuous, hf" in run_cli.stderr and not out.exists() and time.monotonic() - started < 60
    with pytest.raises(PlanError, match="'gatway'"):
        run(Plan.preset("quick", skip={"gatway"}, out=out))  # the library entry checks the same, first
    assert not out.exists()


def quiet_ports(count: int) -> int:
    """The first of `count` free ports below the kernel's ephemeral range: no other process of a parallel run is
    handed one of them meanwhile (free ports from bind(0) come from that range, and a neighbour of one did)."""
    lowest_ephemeral = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    for first in range(lowest_ephemeral - 4000, lowest_ephemeral - count, count):
        with contextlib.ExitStack() as stack:
            try:
                for port in range(first, first + count):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
        return first
    raise AssertionError("no free ports below the ephemeral range")


def test_the_servers_of_a_run_take_ports_from_its_range():
    first = quiet_ports(4)
    taken = socket.socket()
    taken.bind(("127.0.0.1", first))
    taken.listen()
    try:
        ports = parse_port_range(f"{first}-{first + 3}")
        plan = Plan.preset("quick", ports=ports)
        handed = [plan.port() for _ in range(3)]
        assert first not in handed and all(port in ports for port in handed) and len(set(handed)) == 3
    finally:
        taken.close()
    with pytest.raises(ValueError, match="FIRST-LAST"):
        parse_port_range("20000:20100")
    with pytest.raises(PlanError, match="at least 2 ports"):
        Plan.preset("quick", ports=range(20000, 20001)).validate()


def _level(concurrency: int, captions_per_s: float, p50_ms: float, spread_ms: float, n: int = 30,
           extra: dict | None = None, **fields) -> dict:
    return dict(concurrency=concurrency, requests=n, ok=n, errors=0, ramp_requests=0, captions_per_s=captions_per_s,
                p50_ms=p50_ms, mean_ms=p50_ms, p95_ms=p50_ms + spread_ms, extra=extra or {}, **fields)


def test_report_verdicts_say_met_missed_or_na_from_the_answering_figure():
    results = {
        "gateway": [_level(1, 3.0, 1050.0, 10.0),
                    _level(16, 20.0, 3000.0, 100.0),
                    _level(32, 21.0, 6000.0, 100.0, extra={"triton": {"decoder": {"mean_batch_rows": 62.0}}})],
        "baseline": [_level(1, 3.2, 1000.0, 10.0), _level(16, 4.0, 16000.0, 500.0)],
        "perf_analyzer": [_level(1, 3.0, 1269.0, 400.0)],
        "offline": {"results": [{"batch": 32, "captions_per_s": 18.0}, {"batch": 64, "captions_per_s": 25.0}]},
        "cold_start_s": 31.0,
    }
    got = {t["key"]: (None if t["value"] is None else round(t["value"], 3), t["met"]) for t in report.targets(results)}
    # c=1 latency 1.05x with a tight spread: met. Overhead: no per-request samples, so n/a, whatever the
    # level figures (the p50s differ by -219 ms) would suggest.
    assert got == {"throughput_c16": (5.0, True), "latency_c1": (1.05, True), "gateway_overhead": (None, None),
                   "offline_c32": (0.84, True), "cold_start": (31.0, False)}
    detail = {t["key"]: t["detail"] for t in report.targets(results)}["gateway_overhead"]
    assert "n/a" in detail and "219" not in detail

    rng = np.random.default_rng(0)  # per-request samples: 4.8 ms apart, 1 ms jitter -> clearly missed
    samples = {"gateway_outside_ms": list(6.0 + rng.normal(0, 1, 30)),
               "direct_outside_ms": list(1.2 + rng.normal(0, 1, 30))}
    met = {t["key"]: t for t in report.targets(dict(results, overhead_paired=samples))}["gateway_overhead"]
    assert met["met"] is False and 4 < met["value"] < 5.6
    samples["gateway_outside_ms"] = [v - 4.0 for v in samples["gateway_outside_ms"]]  # 0.8 ms: met
    assert report.targets(dict(results, overhead_paired=samples))[2]["met"] is True
    assert "one keep-alive connection" in met["detail"]  # results from before the field: a kept connection
    noisy = {"gateway_outside_ms": [1.0, 9.0, 2.0, 8.0], "direct_outside_ms": [1.0, 1.5, 1.2, 0.9]}  # CI over 2 ms
    assert report.targets(dict(results, overhead_paired=noisy))[2]["met"] is None

    # Served best-of-16 against the greedy baseline: labelled so; the greedy offline loop is no ceiling for it.
    keys = {t["key"]: t for t in report.targets(dict(results, served_candidates=16))}
    assert "ours best-of-16, the baseline greedy" in keys["throughput_c16"]["detail"]
    assert keys["offline_c32"]["met"] is None and "best-of-16" in keys["offline_c32"]["detail"]

    # Noise that straddles a target is n/a, on whichever side the point estimate falls.
    results["baseline"][0] = _level(1, 3.2, 1000.0, 2000.0, n=4)
    results["gateway"][1] = _level(16, 12.0, 3000.0, 6000.0, n=4)
    got = {t["key"]: t["met"] for t in report.targets(results)}
    assert got["latency_c1"] is None and got["throughput_c16"] is None
    results["gateway"][1] = _level(16, 8.0, 3000.0, 10.0)  # 2x the baseline, tightly: missed
    assert {t["key"]: t["met"] for t in report.targets(results)}["throughput_c16"] is False


def test_verdict_is_decided_by_the_whole_interval():
    E = stats.Estimate
    assert stats.verdict(E(1.0, 0.5, 1.5), 2.0, higher_is_better=False) is True
    assert stats.verdict(E(3.0, 2.5, 3.5), 2.0, higher_is_better=False) is False
    assert stats.verdict(E(1.5, 0.5, 2.5), 2.0, higher_is_better=False) is None
    assert stats.verdict(E(1.0), 2.0, higher_is_better=False) is None  # spread unknown
    assert stats.verdict(None, 2.0, higher_is_better=False) is None
    assert stats.verdict(E(5.0, 4.5, 5.5), 4.0, higher_is_better=True) is True


def test_the_median_of_request_pairs_is_not_moved_by_one_stall():
    gateway, direct = [2.0] * 20 + [80.0], [0.5] * 21  # one request stalled 78 ms by another process
    assert stats.welch_difference(gateway, direct).value > 5
    robust = stats.median_difference(gateway, direct)
    assert robust.value == 1.5 and robust.low == robust.high == 1.5
    assert stats.median_difference([1.0] * 4, [0.5] * 4) is None  # too few pairs for an interval
    samples = {"rows_per_request": 4, "gateway_outside_ms": gateway, "direct_outside_ms": direct,
               "new_connection_outside_ms": [3.0] * 21}
    assert "median per request pair 1.50 ms" in overhead.summary(samples)
    assert "(new connection 2.50 ms" in overhead.summary(samples)


def test_request_bodies_are_evaluator_shaped():
    pool = embedding_pool(3, 4, seed=1)
    bodies = loadgen.encode_bodies(pool)
    assert len(bodies) == 3
    values = json.loads(bodies[2])["embedding"]
    assert len(values) == 4 * 1024
    assert np.allclose(values, pool[2].reshape(-1))


def test_engine_verdicts_come_from_the_same_run_ratios_and_their_intervals():
    def levels(rate: float, p50: float, spread: float, n: int = 30) -> list[dict]:
        return [_level(c, rate * (1 + c / 8), p50, spread, n=n) for c in (1, 16, 32)]

    rng = np.random.default_rng(0)
    fast = {"normal": levels(10.0, 1000.0, 10.0), "realistic": levels(20.0, 500.0, 10.0),
            "open_loop": {"extra": {"latencies_ms": list(rng.normal(500, 20, 40))}, "over_deadline": 0}}
    slow = {"normal": levels(10.0, 1000.0, 10.0), "realistic": levels(10.0, 1000.0, 10.0),
            "open_loop": {"extra": {"latencies_ms": list(rng.normal(1000, 20, 40))}, "over_deadline": 0}}
    got = {t["key"]: t["met"] for t in engine_report.targets({"engines": {"hf": slow, "continuous": fast}})}
    assert got == {"realistic_c16": True, "realistic_c32": True, "open_loop_p95": True, "normal_c1": True,
                   "normal_c16": True, "normal_c32": True, "normal_p50_c1": True, "nothing_late": True}
    fast["realistic"] = levels(10.0, 1000.0, 10.0)  # no faster: missed, tightly
    fast["normal"] = levels(10.0, 1000.0, 8000.0, n=3)  # noise straddles 0.95x: n/a, never met
    got = {t["key"]: t["met"] for t in engine_report.targets({"engines": {"hf": slow, "continuous": fast}})}
    assert got["realistic_c16"] is False and got["normal_c16"] is None
    assert "[MISSED]" in engine_report.ratios_text({"engines": {"hf": slow, "continuous": fast}})


