"""The benchmark's engines phase: both decoding engines on both input kinds, from the same run. Apart from
tests/test_bench.py so that parallel workers can share them out.

No test here asserts a timing: the numbers depend on the machine and its load.
"""

from __future__ import annotations

from bench import engine_report
from bench.plan import Plan
from bench.run import run
from conftest import positive


def test_engines_phase_runs_both_engines_on_both_inputs_and_reports_ratios(tiny_checkpoint, tmp_path):
    plan = Plan.preset("quick", checkpoint=tiny_checkpoint, pool_requests=4, out=tmp_path / "run",
                       skip={"gateway", "perf_analyzer", "overhead", "baseline", "offline", "candidates"},
                       engine_levels=[1, 4], open_loop_requests=6)
    results = run(plan)
    assert results["cold_start_s"] is None and "stack_exit_code" not in results  # no phase needed the run's own stack
    phase = results["engines"]
    assert list(phase["engines"]) == ["hf", "continuous"]  # the reference first: it sets the open loop's rate
    assert positive(phase["open_loop_rate_rps"]) and phase["open_loop_capacity_engine"] == "hf"
    for name, entry in phase["engines"].items():
        assert entry["exit_code"] == 0 and positive(entry["cold_start_s"])
        for kind in ("normal", "realistic"):
            assert [level["concurrency"] for level in entry[kind]] == [1, 4]
            assert all(level["errors"] == 0 and positive(level["captions_per_s"]) for level in entry[kind]), name
        loop = entry["open_loop"]
        assert loop["ok"] == 6 and loop["errors"] == 0 and len(loop["extra"]["latencies_ms"]) == 6
    keys = {t["key"]: t for t in engine_report.targets(phase)}
    assert positive(keys["open_loop_p95"]["value"]) and "95% CI" in keys["open_loop_p95"]["detail"]
    assert keys["realistic_c16"]["met"] is None  # c=16 not run in this plan: n/a, not a failure
    assert keys["nothing_late"]["met"] is True
    text = (tmp_path / "run" / "engines.md").read_text()
    assert "| hf | realistic | 4 |" in text and "| continuous | normal | 1 |" in text and "open loop" in text
    assert (tmp_path / "run" / "engines.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
