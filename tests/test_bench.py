"""The benchmark code against a live stack (tiny checkpoint): well-formed reports, non-zero numbers.

No test here asserts a timing: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench import loadgen, report
from bench.common import embedding_pool
from bench.run import Plan, run
from conftest import start_server, stop_process

SECTIONS = ("## Load: our stack", "## Triton direct (perf_analyzer", "## Offline limit", "## Targets",
            "## Machine and settings")


def grpc_url_of(process) -> str:
    args = list(process.args)
    return f"127.0.0.1:{args[args.index('--grpc-port') + 1]}"


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value) and value > 0


@pytest.fixture(scope="module")
def tiny_stack(tiny_checkpoint, tmp_path_factory):
    process, base = start_server(tiny_checkpoint, tmp_path_factory.mktemp("bench_stack"), ready_timeout_s=180)
    yield base, grpc_url_of(process)
    stop_process(process)


def test_quick_run_against_a_live_stack_writes_a_well_formed_report(tiny_stack, tiny_checkpoint, tmp_path):
    base, grpc_url = tiny_stack
    plan = Plan.preset("quick", checkpoint=tiny_checkpoint, levels=[1, 4], pool_requests=8, gateway_url=base,
                       grpc_url=grpc_url, out=tmp_path / "run", pa_requests_per_level=4)
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
    assert all(positive(r["captions_per_s"]) and positive(r["seconds_per_batch_mean"]) for r in offline)
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
    assert keys["latency_c1"]["met"] is not None and positive(keys["latency_c1"]["value"])
    assert keys["gateway_overhead"]["met"] is not None
    assert keys["throughput_c16"]["met"] is None  # level 16 not run: reported as n/a, not as a failure


def test_a_run_that_starts_its_own_stack_measures_cold_start(tiny_checkpoint, tmp_path):
    plan = Plan.preset("quick", checkpoint=tiny_checkpoint, levels=[2], pool_requests=4, out=tmp_path / "run",
                       skip={"baseline", "offline"}, pa_requests_per_level=2)
    results = run(plan)
    assert positive(results["cold_start_s"])
    assert results["stack_exit_code"] == 0
    assert results["gateway"][0]["errors"] == 0 and positive(results["gateway"][0]["captions_per_s"])
    assert "cold start" in (tmp_path / "run" / "report.md").read_text()


def test_report_targets_from_known_numbers():
    level = dict(requests=8, ok=8, errors=0, extra={})
    results = {
        "gateway": [dict(level, concurrency=1, captions_per_s=3.0, p50_ms=1050.0),
                    dict(level, concurrency=16, captions_per_s=20.0, p50_ms=3000.0),
                    dict(level, concurrency=32, captions_per_s=21.0, p50_ms=6000.0,
                         extra={"triton": {"decoder": {"mean_batch_rows": 62.0}}})],
        "baseline": [dict(level, concurrency=1, captions_per_s=3.2, p50_ms=1000.0),
                     dict(level, concurrency=16, captions_per_s=4.0, p50_ms=16000.0)],
        "perf_analyzer": [{"concurrency": 1, "p50_ms": 1049.0}],
        "offline": {"results": [{"batch": 32, "captions_per_s": 18.0}, {"batch": 64, "captions_per_s": 25.0}]},
        "cold_start_s": 31.0,
    }
    got = {t["key"]: (round(t["value"], 3), t["met"]) for t in report.targets(results)}
    assert got == {"throughput_c16": (5.0, True), "latency_c1": (1.05, True), "gateway_overhead": (1.0, True),
                   "offline_c32": (0.84, True), "cold_start": (31.0, False)}


def test_request_bodies_are_evaluator_shaped():
    pool = embedding_pool(3, 4, seed=1)
    bodies = loadgen.encode_bodies(pool)
    assert len(bodies) == 3
    values = json.loads(bodies[2])["embedding"]
    assert len(values) == 4 * 1024
    assert np.allclose(values, pool[2].reshape(-1))


def test_prototype_decoder_matches_hf_generate_and_rows_may_join_mid_batch(tiny_checkpoint):
    from bench.model import load_local_model
    from bench.prototypes.continuous import ContinuousDecoder, FastCaptionGenerator

    reference = load_local_model(tiny_checkpoint, threads=1)
    fast = load_local_model(tiny_checkpoint, threads=1, generator_factory=FastCaptionGenerator)
    rows = embedding_pool(2, 4, seed=7).reshape(-1, 1024)
    prefix = reference.prefix(rows)
    expected = reference.generator.generate(prefix)
    assert fast.generator.generate(prefix) == expected

    decoder = ContinuousDecoder(fast.generator)  # rows arrive at three different steps
    texts = {}
    decoder.add(prefix[:2], [0, 1])
    decoder.step()
    decoder.add(prefix[2:3], [2])
    decoder.step()
    decoder.step()
    decoder.add(prefix[3:], list(range(3, 8)))
    while decoder.active:
        for row in decoder.take_finished():
            texts[row.key] = decoder.text(row)
        decoder.step()
    assert [texts[i] for i in range(8)] == expected
