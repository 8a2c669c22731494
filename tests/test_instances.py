"""One server, one identity: two servers on one host never share a tritonserver or a model repository,
a killed server's leftovers are swept by the next start on its repository, and only those; a Triton
that fails to load a model says why in health."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import (ROOT, free_port, launch_server, leftovers, processes_naming, start_gateway, start_server,
                      start_triton, stop_process, suite_processes, triton_shm_prefix, wait_http, wait_until)
from embcap.contract import PROJECTOR
from embcap.decoder_source import CACHE_ENV
from export import EXPORT_FAILED
from export.options import ExportOptions
from export.repository import export_repository
from runtime.instance import Record, RepositoryInUse, RepositoryLock, lock_path, sweep
from runtime.lifetime import STUB_PROCESS, TRITON_PROCESS
from runtime.models import python_stubs
from runtime.exporting import export_problem
from runtime.triton import TritonOptions, TritonProcess
from runtime.triton_log import TritonLog

# Lines as tritonserver 2.51 prints them on this CPU host (trimmed).
TRITON_LINES = [
    'W1201 09:35:49.112506 7571 pinned_memory_manager.cc:273] "Unable to allocate pinned system memory"',
    'E1201 09:35:49.112657 7571 server.cc:241] "CudaDriverHelper has not been initialized."',
    'E1201 09:39:25.082008 9508 ensemble_scheduler.cc:1468] "unable to create stream for captioner: CUDA driver '
    'version is insufficient for CUDA runtime version"',
    'E1201 09:35:54.397932 7571 backend_model.cc:692] "ERROR: Failed to create instance: ValueError: no tokenizer"',
    'E1201 09:35:54.398045 7571 model_lifecycle.cc:642] "failed to load \'decoder\' version 1: Internal: '
    'ValueError: Couldn\'t instantiate the backend tokenizer from one of: \\n(1) a `tokenizers` file"',
    "error: creating server: Internal - failed to load all models",
]


def exit_code_within(process: subprocess.Popen, timeout_s: float) -> int | None:
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return None


def test_triton_log_names_the_failure_not_the_cpu_hosts_cuda_lines():
    log = TritonLog()
    for line in TRITON_LINES[:3]:
        log.feed(line + "\n")
    assert log.first_error() is None  # a CPU host's CUDA lines are no cause
    for line in TRITON_LINES[3:]:
        log.feed(line + "\n")
    assert log.first_error().startswith("failed to load 'decoder' version 1: Internal: ValueError")
    assert "\\n" not in log.first_error()
    only_final = TritonLog()
    only_final.feed(TRITON_LINES[-1])
    assert only_final.first_error() == "creating server: Internal - failed to load all models"


def test_export_failure_is_prefixed_once():
    message = export_problem(b"[1/4] checkpoint x\nexport failed: projector weights /x/p.safetensors not found\n")
    assert message == EXPORT_FAILED + "[1/4] checkpoint x | projector weights /x/p.safetensors not found"


def test_a_second_server_on_a_taken_grpc_port_refuses_naming_the_port(tiny_triton, tiny_checkpoint, tmp_path):
    """Before: the second server took the first one's Triton for its own and answered with its captions."""
    port = tiny_triton.options.grpc_port
    process, base = launch_server(tiny_checkpoint, tmp_path, extra_args=("--grpc-port", str(port)))
    code = exit_code_within(process, 60)
    if code is None:
        stop_process(process)
    log = (tmp_path / "server.log").read_text()
    assert code == 2, f"still running (or exit {code}):\n{log[-2000:]}"
    assert f"gRPC port {port} is already in use" in log and "tritonserver" in log, log[-2000:]
    assert not (tmp_path / "repo").exists(), "a refused server must not export"


def test_another_triton_on_the_port_is_never_taken_for_ours(tiny_triton, tiny_repository, tmp_path):
    """The port was free when checked and taken when Triton bound it: our Triton fails, the foreign one
    answers ready, and neither the supervisor's wait nor the gateway's health take it for ours."""
    repository = tmp_path / "repository"  # the projector alone loads in a second; then the port is taken
    shutil.copytree(tiny_repository / PROJECTOR, repository / PROJECTOR)
    ours = TritonProcess(TritonOptions(repository, grpc_port=tiny_triton.options.grpc_port),
                         log_file=open(tmp_path / "triton.log", "wb"))
    ours.start()
    try:
        with pytest.raises(RuntimeError, match="exited with code"):
            ours.wait_ready(PROJECTOR, timeout_s=120)  # the foreign Triton's projector is ready all along
    finally:
        ours.stop()
    log = TritonLog()
    for line in (tmp_path / "triton.log").read_text(errors="replace").splitlines():
        log.feed(line)
    assert "already in use" in (log.first_error() or ""), log.errors

    gateway, base = start_gateway(tiny_triton.url, tmp_path / "gateway.log", expect_ready=False,
                                  env={"EMBCAP_TRITON_SERVER_ID": "embcap-not-that-one",
                                       "EMBCAP_STARTUP_WAIT_S": "1"})
    try:
        health = httpx.get(base + "/api/v1/health", timeout=5)
        assert health.status_code == 503
        assert "another server" in health.json()["initialization_status"]["error"]
        refused = httpx.post(base + "/api/v1/inference", json={"embedding": [0.1] * 1024}, timeout=60)
        assert refused.status_code == 503, refused.text
    finally:
        stop_process(gateway)


def test_a_second_server_on_a_locked_repository_refuses_with_the_owners_pid(tiny_server, tiny_checkpoint):
    """Before: the second server exported over the first one's live repository and removed it on exit."""
    owner, base, _ = tiny_server
    repository = Path(next(a for a in owner.args if a.endswith("/repo")))
    exported = sorted(p.name for p in repository.iterdir())
    command = [sys.executable, "server.py", "--checkpoint", str(tiny_checkpoint), "--model-repository",
               str(repository), "--bind", "127.0.0.1", "--port", str(free_port()), "--grpc-port", str(free_port())]
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"is in use by pid {owner.pid}" in second.stderr and "--model-repository" in second.stderr
    assert sorted(p.name for p in repository.iterdir()) == exported, "the owner's repository was touched"
    assert httpx.get(base + "/api/v1/health", timeout=5).status_code == 200


def test_a_killed_servers_leftovers_are_swept_by_the_next_start_and_only_those(tiny_checkpoint, tiny_triton,
                                                                              tmp_path):
    """...and the next start serves the killed one's export again from the export cache (a private one here,
    so that no other test's entry is found or evicted)."""
    cache = {CACHE_ENV: str(tmp_path / "cache")}
    killed, _ = start_server(tiny_checkpoint, tmp_path, ready_timeout_s=180, env=cache)
    prefix = triton_shm_prefix(killed.pid)
    record = json.loads(lock_path(tmp_path / "repo").read_text())
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    # Before: the decoder's stub outlived it (and this test), re-parented to init, for ever.
    repository = str(tmp_path / "repo")
    assert wait_until(lambda: not processes_naming(repository), 10), processes_naming(repository)
    left = leftovers(prefix)
    assert any(p.startswith("/dev/shm/") for p in left) and any(p.startswith("/tmp/") for p in left), left
    assert (tmp_path / "repo").is_dir() and record["pid"] == killed.pid
    others = leftovers(tiny_triton.options.shm_prefix)  # another live server's: never swept
    assert others

    first_log = (tmp_path / "server.log").read_text()
    assert "export cache: no cached export" in first_log and "export cache: the export is not kept" not in first_log
    process, base = start_server(tiny_checkpoint, tmp_path, ready_timeout_s=180, env=cache)
    try:
        assert not leftovers(prefix), leftovers(prefix)
        assert not processes_naming(prefix), "a process of the killed server is still running"
        assert all(not Path(p).exists() for p in record["python_env_dirs"])
        log = (tmp_path / "server.log").read_text()
        assert f"swept what a killed predecessor (pid {killed.pid}) left" in log
        second_log = log[len(first_log):]
        assert "export cache: reused the export" in second_log and "exporting:" not in second_log, second_log
        assert set(others) <= set(leftovers(tiny_triton.options.shm_prefix))
        assert httpx.get(base + "/api/v1/health", timeout=5).json()["status"] == "healthy"
    finally:
        assert stop_process(process) == 0
    assert lock_path(tmp_path / "repo").read_text() == "", "a clean exit leaves nothing to sweep"


def test_a_killed_tritonservers_stubs_end_with_it(tiny_repository, tmp_path):
    """Without a supervisor to clean up after it: its reaper ends the stubs, the decoder's included."""
    triton = start_triton(tiny_repository, tmp_path / "triton.log")
    try:
        stubs = [psutil.Process(pid) for pid in python_stubs(triton.process.pid)]
        assert len(stubs) == 2, stubs
        assert {p.pid for p in suite_processes()} >= {triton.process.pid, *(p.pid for p in stubs)}
        triton.process.kill()
        assert wait_until(lambda: not any(map(running, stubs)), 10), [p for p in stubs if running(p)]
        assert triton.reaper.wait(10) == 0
    finally:
        triton.stop()


def test_the_suites_processes_are_found_where_environments_cannot_be_read(tiny_triton, monkeypatch):
    """Some hosts forbid reading /proc/PID/environ: the session's processes are then known by the temp
    root their command lines name (the end-of-session check depends on it)."""
    expected = {tiny_triton.process.pid, *python_stubs(tiny_triton.process.pid)}
    assert {p.pid for p in suite_processes()} >= expected

    def denied(process):
        raise psutil.AccessDenied(process.pid)

    monkeypatch.setattr(psutil.Process, "environ", denied)
    assert {p.pid for p in suite_processes()} >= expected


def test_the_next_start_ends_a_killed_owners_processes_and_says_so(tiny_repository, tmp_path, caplog):
    """A server killed together with its reaper leaves a tritonserver and stubs running: the next start on
    its repository ends exactly those (they name the record's shared-memory prefix) and logs them."""
    from runtime.serve import claim, parse_args

    orphan = start_triton(tiny_repository, tmp_path / "orphan.log")  # the killed owner's, as far as it knows
    bystander = start_triton(tiny_repository, tmp_path / "bystander.log")  # another live server's
    try:
        orphan.reaper.kill()
        processes = [orphan.process.pid, *python_stubs(orphan.process.pid)]
        repository = tmp_path / "repo"
        owner = subprocess.Popen([sys.executable, "-c", KILLED_OWNER, str(repository), str(tmp_path),
                                  orphan.options.shm_prefix], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
        assert owner.stdout.readline().strip() == "locked"
        owner.kill()  # the kernel drops the lock; the record stays
        owner.wait()
        args = parse_args(["--port", str(free_port()), "--grpc-port", str(free_port()), "--model-repository",
                           str(repository), "--skip-export"])
        with caplog.at_level("WARNING", logger="embcap.server"):
            claim(args).release()
        assert not [pid for pid in processes if alive(pid)]
        message = next(r.getMessage() for r in caplog.records if "swept what a killed predecessor" in r.getMessage())
        for pid in processes:
            assert f"ended pid {pid} (" in message, message
        assert f"({TRITON_PROCESS})" in message and f"({STUB_PROCESS})" in message
        assert bystander.alive() and len(python_stubs(bystander.process.pid)) == 2
    finally:
        orphan.stop()
        bystander.stop()


def alive(pid: int) -> bool:
    try:
        return running(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_tritons_started_together_each_keep_their_own_python_backend_folder(tiny_repository, tmp_path):
    """Before: each took every /tmp/python_env_* folder that appeared between its start and its readiness for its
    own; the first to stop deleted the other's, and that tritonserver aborted at its exit (fts_read error, -6)."""
    tritons = [TritonProcess(TritonOptions(tiny_repository, grpc_port=free_port()),
                             log_file=open(tmp_path / f"triton-{i}.log", "wb")) for i in range(2)]
    try:
        for triton in tritons:
            triton.start()
        for triton in tritons:
            triton.wait_ready(timeout_s=120)
        first, second = (set(triton.python_env_dirs) for triton in tritons)
        assert len(first) == len(second) == 1 and not first & second, (first, second)
        assert tritons[0].stop() == 0
        assert all(Path(path).is_dir() for path in second), "the other server's folder was removed"
        assert tritons[1].stop() == 0, (tmp_path / "triton-1.log").read_text()[-2000:]
    finally:
        for triton in tritons:
            triton.stop()
    assert not any(Path(path).exists() for path in first | second)


KILLED_OWNER = """
import os, sys
from runtime.instance import Record, RepositoryLock
lock = RepositoryLock.acquire(sys.argv[1])
prefix = sys.argv[3] if len(sys.argv) > 3 else "embcap_01234567_"
lock.write(Record(pid=os.getpid(), instance_id="0123456789ab", shm_prefix=prefix, temp_root=sys.argv[2],
                  exports=True))
print("locked", flush=True)
sys.stdin.read()
"""


def test_lock_record_and_sweep_touch_only_the_records_files(tmp_path):
    repository = tmp_path / "repo"
    owner = subprocess.Popen([sys.executable, "-c", KILLED_OWNER, str(repository), str(tmp_path)], cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert owner.stdout.readline().strip() == "locked"
    with pytest.raises(RepositoryInUse, match=f"in use by pid {owner.pid}"):
        RepositoryLock.acquire(repository)
    owner.kill()  # the kernel drops the lock; the record stays
    owner.wait()
    mine, theirs = tmp_path / "embcap_01234567_tmp_x", tmp_path / "embcap_89abcdef_tmp_y"
    for folder in (mine, theirs, repository, tmp_path / "repo.abcd1234"):
        folder.mkdir()
    successor = RepositoryLock.acquire(repository)
    assert successor.predecessor.pid == owner.pid
    removed = sweep(successor.predecessor, successor.repository)
    assert not mine.exists() and not repository.exists() and theirs.exists()
    assert str(tmp_path / "repo.abcd1234") in removed
    assert sweep(Record(pid=1, instance_id="x", shm_prefix="embcap_", temp_root=str(tmp_path)), None) == []
    successor.release()


def test_a_model_that_triton_cannot_load_says_why_in_health(tiny_checkpoint, tmp_path):
    """Before: health said only "tritonserver exited with code 1"; the cause was in Triton's log."""
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, checkpoint)
    repository = export_repository(checkpoint, tmp_path / "repo", ExportOptions(decoder_threads=1),
                                   log=lambda _: None)
    (checkpoint / "decoder" / "tokenizer.json").unlink()  # broken after the export: only Triton can tell
    process, base = launch_server(checkpoint, tmp_path, extra_args=("--skip-export",))
    try:
        deadline, error = time.monotonic() + 120, ""
        while time.monotonic() < deadline and "failed to load" not in error:
            time.sleep(0.5)
            answer = wait_http(base + "/api/v1/health", 30, process, status=503).json()
            error = answer["initialization_status"]["error"] or ""
        assert "failed to load 'decoder'" in error and "tokenizer" in error, error
        assert len(error) < 600
    finally:
        assert stop_process(process) == 0
    assert repository.is_dir(), "--skip-export: the repository is not this server's to remove"


def test_defaults_are_per_instance(monkeypatch):
    from runtime.serve import parse_args

    for name in ("EMBCAP_GRPC_PORT", "EMBCAP_MODEL_REPOSITORY", "EMBCAP_PORT"):
        monkeypatch.delenv(name, raising=False)
    one, two = parse_args([]), parse_args(["--port", "8010"])
    assert (one.grpc_port, two.grpc_port) == (8001, 8011)
    assert one.model_repository != two.model_repository and "8010" in str(two.model_repository)
    assert parse_args(["--port", "8010", "--grpc-port", "9001"]).grpc_port == 9001
