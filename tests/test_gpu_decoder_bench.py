"""The GPU decoder benchmark's own smoke test: a tiny shape on the CPU, both engines, every output file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
