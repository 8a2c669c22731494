"""Peak thread count of the whole server.py tree, for the evaluator's pids_limit=100.

Threads count against the container's pids limit. gRPC, OpenMP, OpenBLAS, ONNX
Runtime and asyncio size their pools from the CPU count, so the tree is measured
twice: on this machine, and with an LD_PRELOAD shim (tests/sandbox/fake_cpus.c)
that makes every process believe the host has 64 CPUs. Threads are sampled from
launch (export, Triton start-up) through 32 concurrent requests to shutdown.
The server gets the thread settings the Dockerfile's ENV gives the container
(without OPENBLAS_NUM_THREADS=1 numpy alone starts one thread per CPU in each
Python process: 151 threads at start-up on 64 CPUs).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from conftest import ROOT, launch_server, stop_process, wait_http
from doctor import dockerfile

THREAD_BUDGET = 90  # the evaluator's pids_limit is 100; keep headroom for health-check and exec'd tools
CONCURRENCY = 32
ROUNDS = 3
SHIM_SOURCE = Path(__file__).resolve().parent / "sandbox" / "fake_cpus.c"
REPORT = ROOT / "reports" / "threads.json"


CAP_SOURCE = ROOT / "runtime" / "cpu_cap.c"


def dockerfile_env() -> dict[str, str]:
    return dockerfile.env(dockerfile.final_stage(dockerfile.load(ROOT / "Dockerfile")))


@pytest.fixture(scope="session")
def cpu_cap_library(tmp_path_factory) -> Path:
    """runtime/cpu_cap.c compiled as the Dockerfile's cpu-cap stage compiles it."""
    return compile_shim(CAP_SOURCE, tmp_path_factory.mktemp("cap") / "cpu_cap.so")


def compile_shim(source: Path, library: Path) -> Path:
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler to build the shims")
    subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(library), str(source), "-ldl"], check=True)
    return library


def container_thread_env(cpu_cap: Path) -> dict[str, str]:
    """The thread settings the Dockerfile gives the container, with its CPU cap built here."""
    values = dockerfile_env()
    env = {k: v for k, v in values.items()
           if k.endswith("_NUM_THREADS") or k.startswith(("OMP_", "GRPC_")) or k == "EMBCAP_CPU_CAP"}
    return {**env, "LD_PRELOAD": str(cpu_cap)}


@pytest.fixture(scope="session")
def fake_cpus_library(tmp_path_factory) -> Path:
    """tests/sandbox/fake_cpus.c compiled into a preloadable library."""
    return compile_shim(SHIM_SOURCE, tmp_path_factory.mktemp("shim") / "fake_cpus.so")


def role(process: psutil.Process) -> str:
    """A readable name for one process of the tree."""
    try:
        name, command = process.name(), process.cmdline()
    except psutil.Error:
        return "gone"
    if name == "triton_python_backend_stub":
        models = [Path(arg).parent.parent.name for arg in command if arg.endswith("/model.py") or "/1/model" in arg]
        return f"stub:{models[0]}" if models else "stub"
    if any(arg.endswith("server.py") for arg in command):
        return "server.py (gateway+supervisor)"
    if "export" in command:
        return "python -m export"
    return name


def tree_threads(root: psutil.Process) -> dict[str, int]:
    """Threads per process (keyed role[pid]) of `root` and all its descendants."""
    counts = {}
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return counts
    for process in processes:
        try:
            counts[f"{role(process)}[{process.pid}]"] = process.num_threads()
        except psutil.Error:
            continue
    return counts


class PeakSampler(threading.Thread):
    """Samples the tree's thread count every `interval_s` and keeps the peak."""

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.stop_event = threading.Event()
        self.peak = 0
        self.peak_breakdown: dict[str, int] = {}
        self.phase = "start-up"
        self.peak_phase = ""
        self.samples = 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            counts = tree_threads(self.root)
            total = sum(counts.values())
            self.samples += 1
            if total > self.peak:
                self.peak, self.peak_breakdown, self.peak_phase = total, counts, self.phase
            time.sleep(self.interval_s)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5)


async def concurrent_load(base: str) -> list[int]:
    rng = np.random.default_rng(0)
    bodies = [{"embedding": rng.standard_normal(4 * 1024).astype(np.float32).tolist()} for _ in range(CONCURRENCY)]
    statuses = []
    # A new connection per request, as the evaluator sends them. A kept one could idle past the gateway's keep-alive
    # (5 s) while a slow round ends and be closed just as it is reused (httpx.ReadError on a busy machine).
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        for _ in range(ROUNDS):
            responses = await asyncio.gather(*(client.post(base + "/api/v1/inference", json=b) for b in bodies))
            statuses += [r.status_code for r in responses]
    return statuses


def measure(checkpoint: Path, work: Path, env: dict[str, str]) -> PeakSampler:
    """Launch server.py with `env` added, load it, stop it; the sampler holds the peak."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        process, base = launch_server(checkpoint, work)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    sampler = PeakSampler(process.pid)
    sampler.start()
    try:
        wait_http(base + "/api/v1/health", 180, process)
        sampler.phase = "idle"
        time.sleep(1)
        sampler.phase = "load"
        statuses = asyncio.run(concurrent_load(base))
        assert statuses == [200] * (CONCURRENCY * ROUNDS)
        sampler.phase = "shutdown"
    finally:
        code = stop_process(process)
        sampler.stop()
    assert code == 0
    return sampler


def record(label: str, sampler: PeakSampler) -> None:
    """Print the peak and its per-process breakdown; keep it in reports/threads.json."""
    entry = {"peak": sampler.peak, "phase": sampler.peak_phase, "samples": sampler.samples,
             "per_process": dict(sorted(sampler.peak_breakdown.items(), key=lambda kv: -kv[1]))}
    print(f"\n[threads] {label}: peak {sampler.peak} during {sampler.peak_phase}: {entry['per_process']}")
    REPORT.parent.mkdir(exist_ok=True)
    data = json.loads(REPORT.read_text()) if REPORT.is_file() else {}
    data[label] = entry
    REPORT.write_text(json.dumps(data, indent=2) + "\n")


@pytest.fixture(scope="module")
def reranking_checkpoint(tmp_path_factory, smollm2_dir) -> Path:
    """Served as the default model is: four models, the reranker's stub and encoder threads included."""
    from tooling.builders import make_tiny_checkpoint, minilm_rerank

    return make_tiny_checkpoint(tmp_path_factory.mktemp("threads") / "ck", smollm2_dir, rerank=minilm_rerank(2),
                                min_new_tokens=1)


def test_thread_peak_on_this_machine(reranking_checkpoint, tmp_path, cpu_cap_library):
    sampler = measure(reranking_checkpoint, tmp_path, container_thread_env(cpu_cap_library))
    record(f"real-{os.cpu_count()}-cpu", sampler)
    assert sampler.peak < THREAD_BUDGET, sampler.peak_breakdown


def test_thread_peak_on_a_simulated_64_cpu_host(reranking_checkpoint, tmp_path, fake_cpus_library, cpu_cap_library):
    # The cap asks the next library for the count (the simulated host's 64), so it is preloaded first.
    env = {**container_thread_env(cpu_cap_library), "LD_PRELOAD": f"{cpu_cap_library} {fake_cpus_library}",
           "EMBCAP_FAKE_CPUS": "64"}
    probe = subprocess.run([sys.executable, "-c", "import os; print(os.cpu_count())"], env={**os.environ, **env},
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == dockerfile_env()["EMBCAP_CPU_CAP"], "the CPU cap does not take effect"
    uncapped = subprocess.run([sys.executable, "-c", "import os; print(os.cpu_count())"], capture_output=True,
                              env={**os.environ, "LD_PRELOAD": str(fake_cpus_library), "EMBCAP_FAKE_CPUS": "64"},
                              text=True, check=True)
    assert uncapped.stdout.strip() == "64", "the simulated host does not take effect"
    sampler = measure(reranking_checkpoint, tmp_path, env)
    record("simulated-64-cpu", sampler)
    assert sampler.peak < THREAD_BUDGET, sampler.peak_breakdown


def test_the_image_preloads_the_cpu_cap_its_own_stage_builds():
    """The Dockerfile compiles runtime/cpu_cap.c in a stage of its own and preloads what it copies."""
    instructions = dockerfile.load(ROOT / "Dockerfile")
    stages = [ins for ins in instructions if ins.keyword == "FROM"]
    assert any(ins.arguments.endswith("AS cpu-cap") for ins in stages) and stages[-1].arguments.startswith("nvcr.io")
    copies = [ins.arguments.split() for ins in dockerfile.final_stage(instructions)
              if ins.keyword == "COPY" and ins.arguments.startswith("--from=cpu-cap")]
    assert copies and copies[0][-1] == dockerfile_env()["LD_PRELOAD"]
    assert int(dockerfile_env()["EMBCAP_CPU_CAP"]) >= 2
