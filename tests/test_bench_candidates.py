"""Benchmark runs that start their own stacks at the checkpoint's candidates: the candidates phase (N=1 and the
shipped N) and a run's cold start. Apart from tests/test_bench.py so that parallel workers can share them out.

No test here asserts a timing: the numbers depend on the machine and its load.
"""

from __future__ import annotations

from bench.plan import Plan
from bench.run import run
from conftest import positive


def test_a_run_that_starts_its_own_stack_measures_cold_start_at_the_shipped_candidates(tmp_path, smollm2_dir):
    from tooling.builders import make_tiny_checkpoint, minilm_rerank

    checkpoint = make_tiny_checkpoint(tmp_path / "ck", smollm2_dir, rerank=minilm_rerank(2))  # ships best-of-2
    plan = Plan.preset("quick", checkpoint=checkpoint, levels=[2], pool_requests=4, out=tmp_path / "run",
                       skip={"baseline", "offline", "engines", "candidates"}, pa_requests_per_level=2)
    results = run(plan)
    assert positive(results["cold_start_s"])
    assert results["stack_exit_code"] == 0 and results["failed_phases"] == {}
    assert results["served_candidates"] == results["checkpoint"]["candidates"] == 2  # read back from Triton
    assert "reranker" in results["gateway"][0]["extra"]["triton"]  # the best-of-N stage ran under the load
    paired = results["overhead_paired"]  # the overhead verdict's own figure, measured in the run
    assert len(paired["gateway_outside_ms"]) == len(paired["direct_outside_ms"]) == 10
    assert len(paired["new_connection_outside_ms"]) == 10  # and as the evaluator connects
    assert results["gateway"][0]["errors"] == 0 and positive(results["gateway"][0]["captions_per_s"])
    text = (tmp_path / "run" / "report.md").read_text()
    assert "cold start" in text and "2 candidates per row as shipped" in text and "served best-of-2" in text
    assert "one keep-alive connection" in text and "a new connection per request (as the evaluator)" in text
    assert "## Failed phases" not in text


def test_candidates_phase_measures_each_n_and_the_shipped_one(tmp_path, smollm2_dir):
    from bench import candidates
    from tooling.builders import make_tiny_checkpoint, minilm_rerank

    checkpoint = make_tiny_checkpoint(tmp_path / "ck", smollm2_dir, rerank=minilm_rerank(2))
    plan = Plan.preset("quick", checkpoint=checkpoint, pool_requests=4, out=tmp_path / "run", candidate_requests=3,
                       skip={"gateway", "perf_analyzer", "overhead", "baseline", "offline", "engines"}, min_requests=2,
                       candidate_concurrency=2)
    results = run(plan)
    assert results["cold_start_s"] is None and "stack_exit_code" not in results  # no phase needed the run's own stack
    phase = results["candidates"]
    assert phase["shipped"] == 2 and sorted(phase["counts"]) == ["1", "2"]  # N=1 and the checkpoint's own
    for count, entry in phase["counts"].items():
        assert entry["exit_code"] == 0 and positive(entry["cold_start_s"])
        assert entry["sequential"]["ok"] == 3 and entry["sequential"]["concurrency"] == 1
        assert entry["loaded"]["errors"] == 0 and positive(entry["loaded"]["captions_per_s"]), count
        assert entry["loaded"]["captions"] == 4 * entry["loaded"]["ok"], "one caption per row, whatever N"
    reranker = phase["counts"]["2"]["sequential"]["extra"]["triton"]["reranker"]
    assert reranker["requests"] == 3 and reranker["compute_ms_per_request"] > 0
    assert "reranker" not in phase["counts"]["1"]["sequential"]["extra"]["triton"]  # N=1: no reranker stage
    text = (tmp_path / "run" / "candidates.md").read_text()
    assert "| 2 (shipped) |" in text and f"target <= {candidates.P50_TARGET_S:g} s" in text
    assert (tmp_path / "run" / "candidates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
