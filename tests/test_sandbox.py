"""server.py under the evaluator's runtime rules, without Docker.

tests/sandbox/sandbox.sh starts it as uid 65534 with no capabilities and
no-new-privileges, everything read-only (the code, the venv, the interpreter),
the checkpoint mounted read-only as models/, fresh noexec tmpfs at /tmp and /run,
a 64 MiB /dev/shm, no HOME, a clean environment and a network namespace with only
the loopback interface. Probes run as nobody inside the same namespaces.

Each test runs in two sandboxes: the September 2025 one (above) and the newest, which
adds an exec-able tmpfs as its /app/cache, HF_HOME, XDG_CACHE_HOME,
TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR pointed there, and a 2 GB /dev/shm.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT

SANDBOX = ROOT / "tests" / "sandbox" / "sandbox.sh"
PROBE = ROOT / "tests" / "sandbox" / "probe.py"
BASE = "http://127.0.0.1:8000"  # the container's port: the sandbox has its own network namespace
NOBODY = 65534
APP_CACHE = "/tmp/app/cache"  # the newest sandbox's /app/cache (no /app on a host; see sandbox.sh)
EVALUATOR_CACHE_ENV = ("HF_HOME", "XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
SANDBOXES = {"sept-2025": {}, "newest": {"EMBCAP_APP_CACHE": APP_CACHE,
                                         **{name: APP_CACHE for name in EVALUATOR_CACHE_ENV}}}

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create mount and network namespaces"),
    pytest.mark.skipif(not all(shutil.which(t) for t in ("unshare", "nsenter", "setpriv", "ip")),
                       reason="needs util-linux unshare/nsenter/setpriv and iproute2"),
]


def readable_copy(source: Path, target: Path) -> Path:
    """Copy with the modes a git checkout gives (files 0644, folders 0755)."""
    shutil.copytree(source, target)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


def probe(pid: int, *args: str, timeout_s: float = 240) -> dict:
    """Run tests/sandbox/probe.py as nobody inside the sandbox of process `pid`."""
    command = ["nsenter", f"--target={pid}", "--mount", "--net", f"--wd={ROOT}", "--",
               str(SANDBOX), "--join", "--", sys.executable, str(PROBE), *args]
    run = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


class Sandboxed:
    def __init__(self, process: subprocess.Popen, log: Path, kind: str) -> None:
        self.process, self.log, self.kind = process, log, kind

    def tree(self) -> list[psutil.Process]:
        root = psutil.Process(self.process.pid)
        return [root, *root.children(recursive=True)]


@pytest.fixture(scope="module", params=list(SANDBOXES))
def sandboxed(request, tiny_checkpoint, tmp_path_factory):
    kind, extra_env = request.param, SANDBOXES[request.param]
    work = tmp_path_factory.mktemp("sandbox")
    models = work / "models"
    models.mkdir()
    readable_copy(tiny_checkpoint, models / "tiny")
    models.chmod(0o755)
    log = work / "server.log"
    command = [str(SANDBOX), str(models), "--", "env", "PYTHONDONTWRITEBYTECODE=1",
               *(f"{name}={value}" for name, value in extra_env.items()), sys.executable, "server.py",
               "--checkpoint", str(ROOT / "models" / "tiny"), "--model-repository", "/tmp/embcap/model_repository",
               "--bind", "127.0.0.1", "--port", "8000", "--grpc-port", "8001"]
    sandbox_env = {**os.environ, "EMBCAP_SANDBOX_APP_CACHE": APP_CACHE} if extra_env else None
    process = subprocess.Popen(command, cwd=ROOT, env=sandbox_env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    sandbox = Sandboxed(process, log, kind)
    try:
        deadline = time.monotonic() + 30  # the namespaces are ready once the process runs as nobody
        while psutil.Process(process.pid).uids().real != NOBODY:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        ready = probe(process.pid, "wait", BASE, "180", timeout_s=200)
        assert ready["healthy"], f"{ready}\n{log.read_text()[-3000:]}"
        yield sandbox
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_the_rules_hold_inside_the_sandbox(sandboxed):
    newest = sandboxed.kind == "newest"
    env = probe(sandboxed.process.pid, "environment", str(ROOT), *([APP_CACHE] if newest else []))
    assert (env["uid"], env["gid"], env["groups"]) == (NOBODY, NOBODY, [])
    assert int(env["cap_effective"], 16) == 0 and int(env["cap_bounding"], 16) == 0
    assert env["no_new_privs"] == "1" and env["home"] is None
    assert env["interfaces"] == ["lo"]
    assert env["writable"] == {str(ROOT): False, str(ROOT / "models"): False, str(ROOT / ".venv"): False,
                               "/": False, "/usr": False, "/root": False,
                               "/tmp": True, "/run": True, "/dev/shm": True, **({APP_CACHE: True} if newest else {})}
    assert env["executable"] == {"/tmp": False, "/run": False, "/dev/shm": False,
                                 **({APP_CACHE: True} if newest else {})}
    assert env["shm_bytes"] == (2 << 30 if newest else 64 << 20)
    assert "embcap" in env["tmp_entries"], env["tmp_entries"]  # the exported model repository
    assert any(name.startswith("embcap_") for name in env["shm_entries"]), env["shm_entries"]


def test_caches_go_to_app_cache_only_where_there_is_one(sandboxed):
    """Newest sandbox: server.py points HOME, EMBCAP_CACHE_DIR and the TensorRT engine cache into
    /app/cache, keeps the evaluator's settings, and every child process inherits them. Before: none."""
    variables = ("HOME", "EMBCAP_CACHE_DIR", "EMBCAP_ENGINE_CACHE_DIR", *EVALUATOR_CACHE_ENV)
    stubs = [p for p in sandboxed.tree() if p.name() in ("tritonserver", "triton_python_backend_stub")]
    assert stubs
    for process in stubs:
        seen = {name: process.environ().get(name) for name in variables}
        if sandboxed.kind == "newest":
            assert seen == {"HOME": f"{APP_CACHE}/home", "EMBCAP_CACHE_DIR": f"{APP_CACHE}/embcap",
                            "EMBCAP_ENGINE_CACHE_DIR": f"{APP_CACHE}/embcap-trt-engines",
                            **{name: APP_CACHE for name in EVALUATOR_CACHE_ENV}}, (process.name(), seen)
        else:
            assert seen == dict.fromkeys(variables), (process.name(), seen)
    if sandboxed.kind == "newest":
        env = probe(sandboxed.process.pid, "environment", str(ROOT), APP_CACHE)
        assert {"home", "embcap", "embcap-trt-engines"} <= set(env["entries"][APP_CACHE]), env["entries"]
        export = [p for p in sandboxed.tree() if p.name() == "tritonserver"][0]
        config = Path(f"/proc/{export.pid}/root/tmp/embcap/model_repository/projector/config.pbtxt").read_text()
        assert f"{APP_CACHE}/embcap-trt-engines" in config  # the export was told where engines go


def test_every_process_runs_as_nobody(sandboxed):
    tree = sandboxed.tree()
    names = {p.name() for p in tree}
    assert {"tritonserver", "triton_python_backend_stub"} <= names, names
    assert {(p.name(), p.uids().real, p.uids().effective) for p in tree} == \
        {(p.name(), NOBODY, NOBODY) for p in tree}


def test_the_api_answers_inside_the_sandbox(sandboxed):
    result = probe(sandboxed.process.pid, "api", BASE)
    assert result["health"] == {"/api/v1/health": 200, "/health": 200, "/": 200}
    for key, (status, count, strings) in result["captions"].items():
        rows = int(key.rsplit(":", 1)[1])
        assert (status, count, strings) == (200, rows, True), key
    assert result["concurrent"] == [[200, 4]] * 16
    assert result["invalid"] == 422


def test_sigterm_stops_the_sandboxed_server_cleanly(sandboxed):
    process = sandboxed.process
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0, sandboxed.log.read_text()[-3000:]
    log = sandboxed.log.read_text()
    assert "Uvicorn running on" in log and "tritonserver ready" in log
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_path_in_the_sandbox(tmp_path):
    """On a GPU: TensorRT engine built into /tmp at start-up, decoder on CUDA in bf16, throughput."""
    import httpx  # noqa: F401  (the probe uses it inside the sandbox)
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from embcap.decoder_source import smollm2_decoder_dir

    models = tmp_path / "models"
    models.mkdir()
    readable_copy(ROOT / "models" / "default", models / "default")
    decoder = smollm2_decoder_dir()
    cache = tmp_path / "cache"
    cache.mkdir()
    readable_copy(decoder, cache / decoder.name)  # readable by nobody, as the image holds it
    for folder in (models, cache):
        folder.chmod(0o755)
    log = tmp_path / "server.log"
    command = [str(SANDBOX), str(models), "--", "env", "PYTHONDONTWRITEBYTECODE=1", f"EMBCAP_CACHE_DIR={cache}",
               "CUDA_VISIBLE_DEVICES=0", sys.executable, "server.py", "--checkpoint", str(ROOT / "models" / "default"),
               "--model-repository", "/tmp/embcap/model_repository", "--bind", "127.0.0.1", "--port", "8000",
               "--accelerator=tensorrt"]
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    try:
        while psutil.Process(process.pid).uids().real != NOBODY:
            assert process.poll() is None, log.read_text()[-3000:]
            time.sleep(0.05)
        assert probe(process.pid, "wait", BASE, "600", timeout_s=620)["healthy"], log.read_text()[-3000:]
        startup_s = time.monotonic() - started
        text = log.read_text()
        assert "TensorrtExecutionProvider" in text.split("projector: running on", 1)[1].splitlines()[0], text[-3000:]
        assert "on cuda/torch.bfloat16" in text
        env = probe(process.pid, "environment", str(ROOT))
        assert "embcap-trt-engines" in env["tmp_entries"]
        rates = probe(process.pid, "throughput", BASE)
        print(f"\n[gpu] start-up {startup_s:.1f} s; captions/s {rates}")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
