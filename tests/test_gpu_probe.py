"""The GPU probe, the unusable-GPU policy and doctor's driver check, on a CPU machine.

A GPU is faked with what the probe reads (device files under a root folder, an nvidia-smi
script on PATH, CUDA_VISIBLE_DEVICES); torch and ONNX Runtime are the real CPU builds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from doctor import driver as doctor_driver
from embcap import cuda_builds
from embcap.checkpoint import CheckpointError, load_checkpoint
from embcap.device import (CPU_ANSWER_BUDGET_S, GpuSignals, ProbeReport, Surroundings, cpu_request_seconds, decide,
                           decoder_parameters, detect_gpu, judge, resolve_decoder_device)
from runtime.gpu_probe import probe

H100_SMI = "535.104.05, NVIDIA H100 80GB HBM3"
PROC_VERSION = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.15  Release Build  "
                "(dvs-builder@U16-I3-B03-4-3)  Tue Mar  5 22:15:33 UTC 2024\nGCC version:  gcc version 12.3.0\n")


def fake_nvidia_smi(folder: Path, output: str = H100_SMI, code: int = 0) -> Path:
    """An nvidia-smi that prints `output` (one CSV line per GPU) and exits with `code`."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' '{output}'\nexit {code}\n")
    script.chmod(0o755)
    return folder


def fake_root(root: Path, devices=("nvidia0", "nvidiactl", "nvidia-uvm"), proc: str | None = PROC_VERSION) -> Path:
    (root / "dev").mkdir(parents=True)
    for name in devices:
        (root / "dev" / name).touch()
    if proc is not None:
        (root / "proc" / "driver" / "nvidia").mkdir(parents=True)
        (root / "proc" / "driver" / "nvidia" / "version").write_text(proc)
    return root


def fake_gpu_env(folder: Path) -> dict[str, str]:
    """Environment for a child process that sees a GPU with driver 535 (nvidia-smi) and CUDA_VISIBLE_DEVICES=0."""
    bin_dir = fake_nvidia_smi(folder / "bin")
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": "0"}


# --- detection -------------------------------------------------------------------------------

def test_detects_device_files_and_the_driver_from_proc(tmp_path):
    root = fake_root(tmp_path / "root")
    signals = detect_gpu(Surroundings(root=root, path=str(tmp_path / "empty"), environ={}))
    assert signals.device_files == ("/dev/nvidia0",)  # nvidiactl and nvidia-uvm are not GPUs
    assert signals.driver == "550.54.15" and signals.driver_source == "/proc/driver/nvidia/version"
    assert signals.visible


def test_nvidia_smi_wins_and_its_failure_is_kept(tmp_path):
    root = fake_root(tmp_path / "root")
    smi = fake_nvidia_smi(tmp_path / "bin", f"{H100_SMI}\n{H100_SMI}")
    signals = detect_gpu(Surroundings(root=root, path=str(smi), environ={}))
    assert (signals.driver, signals.driver_source) == ("535.104.05", "nvidia-smi")
    assert signals.gpu_names == ("NVIDIA H100 80GB HBM3",) * 2

    broken = fake_nvidia_smi(tmp_path / "broken", "Failed to initialize NVML: Driver/library version mismatch", 18)
    signals = detect_gpu(Surroundings(root=root, path=str(broken), environ={}))
    assert signals.driver == "550.54.15"  # from /proc
    assert "exit 18" in signals.nvidia_smi_error and "version mismatch" in signals.nvidia_smi_error


def test_cuda_visible_devices_alone_counts_and_an_empty_value_hides(tmp_path):
    empty = fake_root(tmp_path / "none", devices=(), proc=None)
    nowhere = str(tmp_path / "empty")
    assert not detect_gpu(Surroundings(root=empty, path=nowhere, environ={})).visible
    assigned = detect_gpu(Surroundings(root=empty, path=nowhere, environ={"CUDA_VISIBLE_DEVICES": "0"}))
    assert assigned.visible and assigned.driver is None
    with_gpu = fake_root(tmp_path / "gpu")
    for hidden in ("", "-1", "NoDevFiles"):
        signals = detect_gpu(Surroundings(root=with_gpu, path=nowhere, environ={"CUDA_VISIBLE_DEVICES": hidden}))
        assert not signals.visible, hidden


# --- judging builds against drivers -------------------------------------------------------------

GPU_535 = GpuSignals(("/dev/nvidia0",), "0", "535.104.05", "nvidia-smi")


@pytest.mark.parametrize("version, cuda, driver, usable, needs", [
    ("2.10.0", "12.8", "470.82.01", False, "525.60.13"),
    ("2.10.0", "12.8", "525.60.13", True, None),
    ("2.10.0", "12.8", "535.104.05", True, None),
    ("2.13.0", "13.0", "535.104.05", False, "580.65.06"),
    ("2.13.0", "13.0", "575.57.08", False, "580.65.06"),
    ("2.13.0", "13.0", "580.65.06", True, None),
    ("2.13.0", "13.0", "590.44.01", True, None),
])
def test_driver_against_cuda_build(version, cuda, driver, usable, needs):
    signals = GpuSignals(("/dev/nvidia0",), "0", driver, "nvidia-smi")
    status = judge("torch", version, cuda, signals)
    assert status.usable is usable
    if needs:
        assert f"needs NVIDIA driver >= {needs}, found {driver}" in status.describe()
        assert f"torch {version} (CUDA {cuda} build)" in status.describe()


def test_runtime_own_failure_and_cpu_build():
    failed = judge("torch", "2.10.0", "12.8", GPU_535, works=False, error="CUDA unknown error")
    assert not failed.usable and "CUDA unknown error" in failed.reason
    cpu = judge("torch", "2.13.0+cpu", None, GPU_535)
    assert not cpu.usable and cpu.describe() == "torch 2.13.0+cpu (CPU-only build): no CUDA in this build"


def test_cuda_tables():
    assert cuda_builds.torch_cuda("2.10.0") == "12.8" and cuda_builds.torch_cuda("2.13.0") == "13.0"
    assert cuda_builds.torch_cuda("2.13.0+cpu") is None and cuda_builds.torch_cuda("2.7.1+cu126") == "12.6"
    assert cuda_builds.onnxruntime_cuda("onnxruntime-gpu", "1.26.0") == "12"
    assert cuda_builds.onnxruntime_cuda("onnxruntime-gpu", "1.31.1") == "13"
    assert cuda_builds.onnxruntime_cuda("onnxruntime", "1.32.0") is None
    assert cuda_builds.newest_cuda_major("550.54") == 12 and cuda_builds.newest_cuda_major("580.82.07") == 13
    assert cuda_builds.newest_cuda_major("440.33") is None
    with pytest.raises(KeyError):
        cuda_builds.torch_cuda("1.0.0")
    for major, build in cuda_builds.IMAGE_BUILDS.items():  # each image build is one CUDA major throughout
        assert cuda_builds.cuda_major(cuda_builds.TRITON_CUDA[build["TRITON_RELEASE"]]) == major
        assert cuda_builds.cuda_major(cuda_builds.torch_cuda(build["TORCH"].split("==")[1])) == major
        name, version = build["ONNXRUNTIME"].split("==")
        assert int(cuda_builds.onnxruntime_cuda(name, version)) == major


# --- the real CPU torch under a faked GPU --------------------------------------------------------

def test_probe_with_real_cpu_torch_under_a_faked_gpu(tmp_path):
    root = fake_root(tmp_path / "root")
    smi = fake_nvidia_smi(tmp_path / "bin")
    report = probe(Surroundings(root=root, path=str(smi), environ={"CUDA_VISIBLE_DEVICES": "0"}))
    assert not report.usable("torch") and not report.usable("onnxruntime")
    line = report.problem()
    assert line is not None and "\n" not in line
    assert line.startswith("GPU visible (/dev/nvidia0, nvidia-smi: NVIDIA H100 80GB HBM3, CUDA_VISIBLE_DEVICES=0), "
                           "NVIDIA driver 535.104.05, not usable by torch ")
    assert "(CPU-only build): no CUDA in this build" in line
    assert ProbeReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report


def test_no_gpu_means_no_problem(tmp_path):
    report = probe(Surroundings(root=tmp_path, path=str(tmp_path), environ={}))
    assert report.problem() is None and report.summary() == "no NVIDIA GPU visible: serving on the CPU"
    assert decide(report, "refuse").serve and decide(report, "refuse").device == "cpu"


TORCH_CUDA_VERSION_FILE = """from typing import Optional

__all__ = ['__version__', 'debug', 'cuda', 'git_version', 'hip', 'rocm', 'xpu']
__version__ = '2.9.1+cu128'
debug = False
cuda: Optional[str] = '12.8'
git_version = '0000000000000000000000000000000000000000'
hip: Optional[str] = None
"""


def test_without_a_visible_gpu_torchs_build_is_read_without_importing_torch(tmp_path):
    import torch

    from embcap.device import probe_torch, torch_build

    assert torch_build() == (torch.__version__, torch.version.cuda)
    hidden = detect_gpu(Surroundings(root=tmp_path, path=str(tmp_path), environ={}))
    assert probe_torch(hidden) == judge("torch", torch.__version__, torch.version.cuda, hidden)
    fake = tmp_path / "site" / "torch"  # a CUDA build's file, as torch generates it; and one that is not
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('imported')\n")
    script = ("import sys; from pathlib import Path; "
              "from embcap.device import Surroundings, detect_gpu, probe_torch, torch_build; "
              f"print(torch_build(), probe_torch(detect_gpu(Surroundings(root=Path({str(tmp_path)!r}), path='', "
              "environ={}))).reason, 'torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{ROOT}"}
    for text, expected in ((TORCH_CUDA_VERSION_FILE, "('2.9.1+cu128', '12.8') no GPU visible (needs NVIDIA driver"),
                           ("__version__ = compute()\n", "None not installed False")):
        (fake / "version.py").write_text(text)
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
        assert done.stdout.startswith(expected), done.stdout + done.stderr[-2000:]
        assert done.stdout.strip().endswith("False"), "torch was imported"


# --- policy ------------------------------------------------------------------------------------

def _unusable_report() -> ProbeReport:
    return ProbeReport(GPU_535, (judge("torch", "2.13.0", "13.0", GPU_535),))


def test_cpu_estimate_matches_the_measured_default_and_rules_out_8b():
    # The default SmolLM2-135M: 3.1 s for a 4-row, 32-token request measured on 2 vCPUs (bench/RESULTS.md).
    assert 2.5 < cpu_request_seconds(134_515_008, 32) < 3.5
    assert cpu_request_seconds(8_030_261_248, 32) > 5 * CPU_ANSWER_BUDGET_S  # Llama-3-8B: ~190 s
    assert cpu_request_seconds(134_515_008, 300) < CPU_ANSWER_BUDGET_S  # the reference's 300 tokens still fit


@pytest.mark.parametrize("policy, seconds, serve, words", [
    ("serve-cpu", None, True, "Decoder on the CPU (policy serve-cpu)"),
    ("refuse", None, False, "Refusing to serve on the CPU (policy refuse)"),
    ("auto", 3.1, True, "Decoder on the CPU (policy auto: ~3 s per request estimated on the CPU, budget 30 s)"),
    ("auto", 187.0, False, "Refusing to serve (policy auto: ~187 s per request"),
    ("auto", None, True, "policy auto, decoder size unknown"),
])
def test_policy(policy, seconds, serve, words):
    decision = decide(_unusable_report(), policy, seconds)
    assert (decision.serve, decision.device) == (serve, "cpu")
    assert "needs NVIDIA driver >= 580.65.06, found 535.104.05" in decision.line and words in decision.line


def test_resolve_decoder_device_for_the_decoder(tiny_checkpoint):
    decoder_dir = load_checkpoint(tiny_checkpoint).local_decoder_path()
    assert resolve_decoder_device("cpu", "refuse").device == "cpu"
    quiet = resolve_decoder_device("auto", "refuse")  # this machine: no GPU visible, CPU torch
    assert (quiet.serve, quiet.device, quiet.line) == (True, "cpu", None)
    refused = resolve_decoder_device("auto", "auto", decoder_dir=decoder_dir, max_new_tokens=10**7,
                                     report=_unusable_report())
    assert not refused.serve and "Refusing to serve (policy auto" in refused.line
    served = resolve_decoder_device("auto", "auto", decoder_dir=decoder_dir, report=_unusable_report())
    assert served.serve and "Decoder on the CPU (policy auto" in served.line


def test_decoder_parameters_reads_safetensors_headers(tiny_checkpoint):
    from transformers import AutoConfig, AutoModelForCausalLM

    decoder_dir = load_checkpoint(tiny_checkpoint).local_decoder_path()
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(decoder_dir))
    assert decoder_parameters(decoder_dir) == model.num_parameters()


def test_checkpoint_setting(tiny_checkpoint, tmp_path):
    assert load_checkpoint(tiny_checkpoint).spec.on_unusable_gpu == "auto"
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint")
    spec = json.loads((copy / "caption_model.json").read_text())
    for value, ok in (("refuse", True), ("serve-cpu", True), ("gpu-or-nothing", False)):
        (copy / "caption_model.json").write_text(json.dumps({**spec, "on_unusable_gpu": value}))
        if ok:
            assert load_checkpoint(copy).spec.on_unusable_gpu == value
        else:
            with pytest.raises(CheckpointError, match="on_unusable_gpu"):
                load_checkpoint(copy)


def test_probe_command_under_a_faked_gpu(tiny_checkpoint, tmp_path):
    run = subprocess.run([sys.executable, "-m", "runtime.gpu_probe", "--json", "--checkpoint", str(tiny_checkpoint)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, **fake_gpu_env(tmp_path)})
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert answer["decision"]["serve"] and answer["decision"]["policy"] == "auto"
    line = answer["decision"]["line"]
    assert "NVIDIA driver 535.104.05" in line and "policy auto: ~0 s" in line
    plain = subprocess.run([sys.executable, "-m", "runtime.gpu_probe", "--policy", "refuse"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120, env={**os.environ, **fake_gpu_env(tmp_path)})
    assert plain.stdout.splitlines()[0].endswith("Refusing to serve on the CPU (policy refuse)")


# --- doctor --driver ------------------------------------------------------------------------------

def doctor_driver_rows(repo: Path, driver: str) -> tuple[int, dict[str, tuple[str, str]], str]:
    run = subprocess.run([sys.executable, "-m", "doctor", "--repo", str(repo), "--skip-export", "--driver", driver],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    section = run.stdout.split(f"NVIDIA driver {driver}: what of the image would use the GPU", 1)[1]
    rows = {m[1]: (m[2], m[3]) for line in section.splitlines()
            if (m := re.match(r"^(\S+)\s+(PASS|FAIL|WARN|SKIP)\s+(.*)$", line))}
    return run.returncode, rows, run.stdout


def test_dockerfile_defaults_are_the_widest_build():
    assert doctor_driver.default_build_matches(ROOT)
    assert [b.cuda for b in doctor_driver.image_builds(ROOT)] == ["12.8.0", "12.8", "12"]


@pytest.mark.parametrize("driver, failing", [
    ("470.82.01", {"gpu-tensorrt", "gpu-decoder", "gpu-projector"}),
    ("535.104.05", set()),
    ("550.54", set()),
    ("580.65.06", set()),
])
def test_doctor_driver_on_the_pinned_builds(driver, failing):
    code, rows, output = doctor_driver_rows(ROOT, driver)
    assert {name for name, (status, _) in rows.items() if status == "FAIL"} == failing, output
    assert set(rows) >= {"driver", "gpu-tensorrt", "gpu-decoder", "gpu-projector"}
    if failing:
        assert "needs driver >= 525.60.13, not 470.82.01" in rows["gpu-decoder"][1]
        assert "no image build in the table of docs/gpu-builds.md runs on driver 470.82.01" in rows["driver-advice"][1]
        assert code == 1
    else:
        assert "the decoder on the GPU" in rows["gpu-decoder"][1]


def test_doctor_driver_on_the_cuda13_build(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    text = (ROOT / "Dockerfile").read_text()
    for name, value in cuda_builds.IMAGE_BUILDS[13].items():
        text = re.sub(rf"^ARG {name}=.*$", f"ARG {name}={value}", text, flags=re.M)
    (repo / "Dockerfile").write_text(text)
    shutil.copy2(ROOT / "requirements.txt", repo)
    _, rows, output = doctor_driver_rows(repo, "535.104.05")
    assert rows["gpu-decoder"][0] == "FAIL" and "torch 2.13.0 (CUDA 13.0) needs driver >= 580.65.06" in output
    assert rows["gpu-tensorrt"][0] == "FAIL" and "tritonserver:25.08-py3 (CUDA 13.0.0)" in output
    assert "--build-arg TORCH=torch==2.10.0" in rows["driver-advice"][1]
    _, rows, output = doctor_driver_rows(repo, "580.65.06")
    assert {status for status, _ in rows.values()} == {"PASS"}, output


# --- the real stack under a faked GPU -------------------------------------------------------------

@pytest.fixture(scope="module")
def refusing_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint with on_unusable_gpu "refuse"."""
    copy = shutil.copytree(tiny_checkpoint, tmp_path_factory.mktemp("refusing") / "checkpoint")
    spec = json.loads((copy / "caption_model.json").read_text())
    (copy / "caption_model.json").write_text(json.dumps({**spec, "on_unusable_gpu": "refuse"}))
    return copy


def test_server_serves_on_cpu_and_says_why(refusing_checkpoint, tmp_path):
    """--on-unusable-gpu serve-cpu overrides the checkpoint's refuse: healthy, reason in health, device in /metrics."""
    import httpx
    import torch

    from conftest import start_server, stop_process

    process, base = start_server(refusing_checkpoint, tmp_path, ready_timeout_s=180,
                                 extra_args=("--on-unusable-gpu", "serve-cpu"), env=fake_gpu_env(tmp_path))
    try:
        body = httpx.get(f"{base}/api/v1/health", timeout=5).json()
        assert body["status"] == "healthy" and body["initialization_status"]["model_loaded"] is True
        error = body["initialization_status"]["error"]
        assert "NVIDIA driver 535.104.05" in error and f"not usable by torch {torch.__version__} (" in error
        assert error.endswith("Decoder on the CPU (policy serve-cpu)")
        metrics = httpx.get(f"{base}/metrics", timeout=5).text
        assert 'embcap_model_device{device="cpu",model="decoder"} 1.0' in metrics
        assert 'embcap_model_device{device="cpu",model="projector"} 1.0' in metrics
        response = httpx.post(f"{base}/api/v1/inference", json={"embedding": [0.01] * 1024}, timeout=60)
        assert response.status_code == 200 and len(response.json()["texts"]) == 1
    finally:
        assert stop_process(process) == 0
    log = (tmp_path / "server.log").read_text()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{") and "535.104.05" in line]
    assert [(entry["level"], entry["msg"]) for entry in lines] == [("warning", error)], log[-3000:]


def test_server_refuses_and_stays_unhealthy(refusing_checkpoint, tmp_path):
    """The checkpoint's refuse: health 503 with the reason, no tritonserver, no ready banner; SIGTERM exits 0."""
    import time

    import httpx
    import psutil

    from conftest import launch_server, stop_process, wait_http

    process, base = launch_server(refusing_checkpoint, tmp_path,
                                  env={**fake_gpu_env(tmp_path), "EMBCAP_STARTUP_WAIT_S": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:
            response = wait_http(f"{base}/api/v1/health", 60, process, status=503)
            error = response.json()["initialization_status"]["error"]
            if "Refusing" in error or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert "NVIDIA driver 535.104.05" in error and error.endswith("Refusing to serve on the CPU (policy refuse)")
        time.sleep(3)
        for path in ("/api/v1/health", "/health", "/"):
            response = httpx.get(base + path, timeout=5)
            assert response.status_code == 503 and response.json()["initialization_status"]["error"] == error
        inference = httpx.post(f"{base}/api/v1/inference", json={"embedding": [0.01] * 1024}, timeout=60)
        assert inference.status_code == 503 and "Refusing" in inference.json()["detail"]
        assert not [c for c in psutil.Process(process.pid).children(recursive=True) if c.name() == "tritonserver"]
    finally:
        assert stop_process(process) == 0
    log = (tmp_path / "server.log").read_text()
    assert "Uvicorn running on" not in log
    entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert [e["level"] for e in entries if e["logger"] == "embcap.server" and "Refusing" in e["msg"]] == ["error"]
