"""The GPU decoder benchmark's own smoke test: a tiny shape on the CPU, every engine (FP8 included), every
output file, and FP8's agreement on a checkpoint's own weights and held-out rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tooling.builders import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ["hf", "continuous", "continuous fp8 static", "continuous fp8 dynamic"]


def checkpoint_with_heldout_rows(folder: Path, tokenizer_dir: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = make_tiny_checkpoint(folder, tokenizer_dir)
    embeddings = np.random.default_rng(0).standard_normal((70, 1024)).astype(np.float32)
    pq.write_table(pa.table({"video_embed": list(embeddings), "description": ["a dog"] * 70}),
                   root / "heldout.parquet")
    return root


def test_gpu_decoder_bench_runs_on_the_cpu_with_a_tiny_shape(tmp_path, smollm2_dir):
    checkpoint = checkpoint_with_heldout_rows(tmp_path / "ck", smollm2_dir)
    command = [sys.executable, "-m", "bench.gpu_decoder", "--shape", "tiny", "--device", "cpu", "--batches", "1,4",
               "--new-tokens", "4", "--repeats", "1", "--profile", "--candidates", "2,3", "--candidate-rows", "2",
               "--tokenizer", str(smollm2_dir), "--agreement-checkpoint", str(checkpoint), "--agreement-rows", "4",
               "--out", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [engine["engine"] for engine in report["engines"]] == ENGINES
    assert report["agreement"] == 1.0, "fp32 greedy captions must be the same from both engines"
    assert set(report["fp8_agreement"]) == {"static", "dynamic"}
    assert report["floor_ms"] is None  # no known bandwidth for a CPU: no made-up floor
    for engine in report["engines"]:
        assert engine["floor_ms"] is None
        for batch in ("1", "4"):
            entry = engine["batches"][batch]
            assert entry["ms_per_step"] > 0 and entry["request_s"] > 0 and entry["captions_per_s"] > 0
    unquantised, static, dynamic = report["engines"][1:]
    assert max(static["weight_gb"], dynamic["weight_gb"]) < unquantised["weight_gb"]
    assert static["prepare_s"] > 0 and "prepare_s" not in unquantised
    for engine in (unquantised, static, dynamic):
        assert engine["profile"][0]["kernels"] > 0 and engine["profile"][0]["top"]
    real = report["real_weights_agreement"]
    assert real["rows"] == 4 and real["checkpoint"] == str(checkpoint)
    for mode in ("static", "dynamic"):
        assert 0 <= real[mode]["identical_captions"] <= 1 and 0 < real[mode]["top1_agreement"] <= 1
        assert real[mode]["kl"] >= 0 and real[mode]["tokens"] > 0
    assert [(e["candidates"], e["slots"]) for e in report["candidates"]] == [(2, 4), (3, 6)]
    assert all(e["ms_per_step"] > 0 and e["request_s"] > 0 for e in report["candidates"])
    text = (tmp_path / "out" / "results.md").read_text()
    assert "| continuous | 4 |" in text and "| continuous fp8 static | 4 |" in text and "| 2 x 3 | 6 |" in text
    assert "CPU `_scaled_mm`" in text and "| static |" in text
    assert (tmp_path / "out" / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in done.stdout


def test_the_fp8_quality_evaluation_scores_every_variant_on_a_checkpoints_heldout_rows(tmp_path, smollm2_dir):
    from evaluate.fp8_quality import main

    checkpoint = checkpoint_with_heldout_rows(tmp_path / "ck", smollm2_dir)
    assert main(["--checkpoint", str(checkpoint), "--rows", "3", "--slots", "2", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["rows"] == 3 and report["calibration_rows"] == 64 and report["candidates"] == 1
    assert list(report["variants"]) == ["unquantised", "static", "dynamic"]
    for name in ("static", "dynamic"):
        entry = report["variants"][name]
        assert len(entry["scores"]) == 3 and entry["delta"]["low"] <= entry["delta"]["mean"] <= entry["delta"]["high"]
        assert entry["delta"]["verdict"] in ("met", "missed", "n/a") and 0 < entry["top1_agreement"] <= 1
    text = (tmp_path / "out" / "results.md").read_text()
    assert "| FP8, static input scales |" in text and "CPU `_scaled_mm` in-process" in text
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
