"""The GPU decoder benchmark's own smoke test: a tiny shape on the CPU, both engines, every output file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_decoder_bench_runs_on_the_cpu_with_a_tiny_shape(tmp_path, smollm2_dir):
    command = [sys.executable, "-m", "bench.gpu_decoder", "--shape", "tiny", "--device", "cpu", "--batches", "1,4",
               "--new-tokens", "4", "--repeats", "1", "--profile", "--candidates", "2,3", "--candidate-rows", "2",
               "--tokenizer", str(smollm2_dir),
               "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert [engine["engine"] for engine in report["engines"]] == ["hf", "continuous"]
    assert report["agreement"] == 1.0, "fp32 greedy captions must be the same from both engines"
    assert report["floor_ms"] is None  # no known bandwidth for a CPU: no made-up floor
    for engine in report["engines"]:
        for batch in ("1", "4"):
            entry = engine["batches"][batch]
            assert entry["ms_per_step"] > 0 and entry["request_s"] > 0 and entry["captions_per_s"] > 0
    profile = report["engines"][1]["profile"]
    assert profile[0]["kernels"] > 0 and profile[0]["top"]
    assert [(e["candidates"], e["slots"]) for e in report["candidates"]] == [(2, 4), (3, 6)]
    assert all(e["ms_per_step"] > 0 and e["request_s"] > 0 for e in report["candidates"])
    text = (tmp_path / "results.md").read_text()
    assert "| continuous | 4 |" in text and "| 2 x 3 | 6 |" in text
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in done.stdout


def test_startup_bench_times_a_tiny_decoder_from_process_start_to_healthy(tmp_path):
    command = [sys.executable, "-m", "bench.startup", "--shapes", "tiny", "--out", str(tmp_path), "--timeout-s", "240"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (row,) = json.loads((tmp_path / "startup.json").read_text())
    assert row["shape"] == "tiny" and row["healthy_s"] > 0
    assert row["weights_load_s"] is not None and row["weights_gb"] > 0.001, "the decoder logs its weights' load"
    assert "| tiny |" in (tmp_path / "startup.md").read_text()
    assert not (tmp_path / "work" / "tiny" / "checkpoint").exists()


def test_the_gpu_stack_script_runs_the_whole_stack_on_the_cpu_with_a_tiny_shape(tmp_path):
    command = [sys.executable, "bench/gpu_stack.py", "run", "--shape", "tiny", "--device", "cpu", "--candidates", "2",
               "--requests", "3", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_stack.json").read_text())
    assert len(report["request_s"]) == 3 and not report["lost"] and report["exit_code"] == 0
    assert report["healthy_s"] > 0 and report["step_ms_in_triton"] > 0, "the engine's step histogram is scraped"
    assert report["health"]["status"] == "healthy"
    assert any(line.startswith("decoder:") and "on cpu/" in line for line in report["placement"])
    assert any(line.startswith("reranker:") for line in report["placement"])
    assert "decode step inside Triton" in (tmp_path / "gpu_stack.md").read_text()


@pytest.mark.slow
def test_the_gpu_stack_parts_each_fit_one_transfer(tmp_path):
    """Each part travels to a bare host in one call (64 MiB with the repository itself)."""
    for part, limit_mib in (("triton", 30), ("wheels", 32)):
        done = subprocess.run([sys.executable, "-m", "bench.gpu_stack", "bundle", "--part", part, "--out",
                               str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "tritonserver.tar.xz").stat().st_size < 30 * 2**20
    assert (tmp_path / "wheels.tar").stat().st_size < 32 * 2**20
