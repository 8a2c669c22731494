"""Fixtures that start the real tritonserver, gateway and server.py on free ports."""

from __future__ import annotations

import fcntl
import getpass
import glob
import math
import os
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from runtime.local import ROOT, free_port, stop_process, wait_http
from runtime.threads import no_grpc_fork_handlers, worker_environment

no_grpc_fork_handlers()  # tests start tritonserver (a preexec_fn) while their gRPC clients are busy

os.environ.setdefault("EMBCAP_CACHE_DIR", str(ROOT / ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Every process the suite starts inherits this mark: at the end of the session, a tritonserver or a stub
# that carries it has outlived the suite (pytest_sessionfinish). Parallel workers (pytest-xdist) inherit the
# controller's mark with its environment, and the controller alone checks, once every worker has ended: a
# worker's own session status never reaches the run's exit status.
# The mark names the process that made it, so that a second import of this module in that process keeps it.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
_inherited = os.environ.get("EMBCAP_TEST_SESSION", "")
SESSION_MARK = ("EMBCAP_TEST_SESSION", _inherited if XDIST_WORKER or _inherited.startswith(f"{os.getpid()}:")
                else f"{os.getpid()}:{uuid.uuid4().hex}")
os.environ[SESSION_MARK[0]] = SESSION_MARK[1]
OUTLIVE_GRACE_S = 10.0  # how long the session's processes may take to go once the last test is done
# The test processes run as the serving processes do (runtime.threads), before numpy and torch are imported: one
# thread per library, OpenMP workers that sleep rather than spin, no hub. Two pytest workers share the cores, and
# torch's pool of a thread per core in each, spinning while the other ran, made one SmolLM2 decode 9x slower.
os.environ.update(worker_environment())

from embcap.decoder_source import smollm2_decoder_dir  # noqa: E402
from embcap.staged_folder import staged_folder  # noqa: E402
from export.options import ExportOptions  # noqa: E402
from runtime.lifetime import STUB_PROCESS, TRITON_PROCESS  # noqa: E402
from runtime.triton import TritonOptions, TritonProcess, shm_regions  # noqa: E402

__all__ = ["ROOT", "free_port", "stop_process", "wait_http"]  # also used by the test modules

# torch and transformers (export.repository, tooling.builders) are imported by the fixtures that use them: every
# pytest process loads this file, among them the parallel run's controller and the sub-runs of
# test_session_check, which use neither (about 2 s of CPU each).

# A long queue delay makes concurrent test requests meet in one batch deterministically.
TEST_QUEUE_DELAY_US = 50_000


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return smollm2_decoder_dir()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, smollm2_dir) -> Path:
    """The tiny checkpoint, written once per run and shared by the parallel workers (in the run's temp folder,
    under a lock), so that the servers started on it reuse one export (export.cache). Read-only: a test that
    changes a checkpoint changes a copy."""
    run = tmp_path_factory.getbasetemp().parent if XDIST_WORKER else tmp_path_factory.getbasetemp()
    target = run / "tiny-shared" / "checkpoint"
    with open(run / "tiny-shared.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_dir():
            from tooling.builders import make_tiny_checkpoint  # imported here, not at the top (the note above)

            with staged_folder(target) as staging:
                make_tiny_checkpoint(staging, smollm2_dir)
    return target


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory, tiny_checkpoint) -> Path:
    from export.repository import export_repository

    options = ExportOptions(max_batch_size=16, queue_delay_us=TEST_QUEUE_DELAY_US, decoder_threads=1)
    return export_repository(tiny_checkpoint, tmp_path_factory.mktemp("repo") / "model_repository", options,
                             log=lambda _: None)


def start_triton(repository: Path, log_path: Path, port: int | None = None) -> TritonProcess:
    """A real tritonserver (on a free port unless given), ready to serve."""
    options = TritonOptions(repository, grpc_port=port or free_port())
    triton = TritonProcess(options, log_file=open(log_path, "ab"))
    triton.start()
    triton.wait_ready(timeout_s=120)
    return triton


@pytest.fixture(scope="session")
def tiny_triton(tiny_repository, tmp_path_factory):
    triton = start_triton(tiny_repository, tmp_path_factory.mktemp("logs") / "triton.log")
    yield triton
    triton.stop()
    assert not shm_regions(triton.options.shm_prefix), "tritonserver left shared memory behind"


def start_gateway(triton_url: str, log_path: Path, expect_ready: bool = True,
                  env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`python -m gateway` as a real process on a free port, waited for until it answers."""
    port = free_port()
    environment = {**os.environ, "EMBCAP_TRITON_URL": triton_url, **(env or {})}
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--port", str(port)], cwd=ROOT, env=environment,
        stdout=open(log_path, "ab"), stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/api/v1/health", 60, process, status=200 if expect_ready else 503)
    return process, base


@pytest.fixture(scope="session")
def tiny_gateway(tiny_triton, tmp_path_factory):
    process, base = start_gateway(tiny_triton.url, tmp_path_factory.mktemp("logs") / "gateway.log",
                                  env={"EMBCAP_BODY_TIMEOUT_S": "2"})
    yield base
    stop_process(process)


def send_staggered(caption, inputs: dict, gap_s: float = 0.02) -> dict:
    """Send every input twice from its own thread, `gap_s` apart; the last answer per key."""
    import threading
    import time

    answers: dict = {}

    def send(key, delay: float) -> None:
        time.sleep(delay)
        answers[key] = caption(inputs[key])

    threads = [threading.Thread(target=send, args=(key, gap_s * i)) for i, key in enumerate(list(inputs) * 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def launch_server(checkpoint: Path, work: Path, extra_args: tuple[str, ...] = (),
                  env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """server.py (export + Triton + gateway) as the container runs it, on free ports; no waiting."""
    port = free_port()
    command = [
        sys.executable, "server.py", "--checkpoint", str(checkpoint), "--model-repository", str(work / "repo"),
        "--bind", "127.0.0.1", "--port", str(port), "--grpc-port", str(free_port()), *extra_args,
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=open(work / "server.log", "ab"), stderr=subprocess.STDOUT,
                               env={**os.environ, **(env or {})})
    return process, f"http://127.0.0.1:{port}"


def start_server(checkpoint: Path, work: Path, ready_timeout_s: float = 300, extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """launch_server, then wait until health says healthy."""
    process, base = launch_server(checkpoint, work, extra_args, env)
    try:
        wait_http(f"{base}/api/v1/health", ready_timeout_s, process)
    except BaseException:
        stop_process(process)
        raise
    return process, base


def triton_shm_prefix(server_pid: int) -> str:
    """The shared-memory prefix server.py gave its tritonserver (read from its command line)."""
    for child in psutil.Process(server_pid).children():
        if child.name() == "tritonserver":
            for arg in child.cmdline():
                if "shm-region-prefix-name=" in arg:
                    return arg.split("shm-region-prefix-name=")[1]
    raise AssertionError("no tritonserver child found")


def leftovers(prefix: str) -> list[str]:
    """Shared memory and temp folders of the server with this prefix that still exist."""
    return glob.glob(f"/dev/shm/{prefix}*") + glob.glob(f"/tmp/{prefix}*")


@contextmanager
def serving(checkpoint: Path, work: Path) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    """server.py on `checkpoint` with Triton metrics on; yields (process, base url, log path). Stopped on exit,
    which must leave no shared memory, temp folder or exported repository behind."""
    process, base = start_server(checkpoint, work, ready_timeout_s=120,
                                 extra_args=("--metrics-port", str(free_port())))
    prefix = triton_shm_prefix(process.pid)
    try:
        yield process, base, work / "server.log"
    finally:
        stop_process(process)
    assert not leftovers(prefix), f"left behind: {leftovers(prefix)}"
    assert not (work / "repo").exists(), "the exported model repository was left behind"


SESSION_TEMP: list[Path] = []  # the session's pytest temp root, once known (record_session_temp)


@pytest.fixture(scope="session", autouse=True)
def record_session_temp(tmp_path_factory):
    SESSION_TEMP.append(tmp_path_factory.getbasetemp())


def temp_root_user() -> str:
    """The user name in pytest's temp root (pytest's own fallback where none can be found)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def started_by_this_session(process: psutil.Process) -> bool:
    """Whether `process` carries SESSION_MARK; where its environment cannot be read (some hosts forbid
    reading /proc/PID/environ), whether its command line names a path under the session's temp root
    (every repository the suite serves is exported there). The controller of parallel workers runs no test:
    its root is this user's pytest temp folder, which its workers' roots are under."""
    try:
        return process.environ().get(SESSION_MARK[0]) == SESSION_MARK[1]
    except psutil.AccessDenied:
        user_root = Path(tempfile.gettempdir()) / f"pytest-of-{temp_root_user()}"
        roots = [str(root) for root in SESSION_TEMP] or [str(user_root)]
        return any(root in arg for arg in process.cmdline() for root in roots)


def suite_processes() -> list[psutil.Process]:
    """The tritonserver and stub processes this test session started that are still running."""
    found = []
    for process in psutil.process_iter(["name"]):
        try:
            if process.info["name"] in (TRITON_PROCESS, STUB_PROCESS) and \
                    process.status() != psutil.STATUS_ZOMBIE and started_by_this_session(process):
                found.append(process)
        except psutil.Error:  # gone, or another user's
            continue
    return found


def processes_naming(text: str) -> list[str]:
    """'pid N (name)' of this user's running processes whose command line contains `text`."""
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        try:
            if any(text in arg for arg in process.info["cmdline"] or ()) and process.pid != os.getpid() \
                    and process.status() != psutil.STATUS_ZOMBIE:
                found.append(f"pid {process.pid} ({process.info['name']})")
        except psutil.Error:
            continue
    return found


def in_process_choice(checkpoint: Path, embeddings):
    """What the in-process pipeline answers for `embeddings` (candidates decoded, then reranked), to compare a
    live stack's answers with."""
    from embcap.loading import resolve_checkpoint
    from embcap.pipeline import CaptionPipeline

    pipeline = CaptionPipeline(resolve_checkpoint(checkpoint), slots=8)
    try:
        return pipeline.choose(embeddings, pipeline.candidate_rows(embeddings))
    finally:
        pipeline.close()


def positive(value) -> bool:
    """A finite number above zero (a measured figure that was measured)."""
    return isinstance(value, (int, float)) and not math.isnan(value) and value > 0


def wait_until(predicate, timeout_s: float, interval_s: float = 0.1) -> bool:
    """Poll `predicate` until it is true (True) or `timeout_s` has passed (False)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True


# The modules that take longest, longest first (measured: `make test` prints the slowest tests). Parallel runs hand
# out whole modules in collection order (make test: --dist loadfile --no-loadscope-reorder), so these go out first
# and the short ones fill in around them; otherwise the run ends waiting on one long module started last. Only the
# order changes; a module not named here runs after these, in file order.
LONGEST_MODULES = (
    "test_bench_candidates", "test_instances", "test_threads", "test_gpu_decoder_bench", "test_bench", "test_e2e",
    "test_server", "test_faults", "test_doctor", "test_training", "test_stack", "test_admission", "test_bench_engines",
    "test_engines_live", "test_watchdog", "test_gpu_probe", "test_session_check", "test_sandbox",
    "test_reward_training", "test_evaluate", "test_engine_restart", "test_rerank_live",
)


def pytest_collection_modifyitems(items):
    """Longest modules first (LONGEST_MODULES); a stable sort, so tests keep their order within a module."""
    rank = {name: index for index, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """Fail the session when a tritonserver or a stub it started outlives it (they are ended here)."""
    if XDIST_WORKER:
        return  # the controller checks, once every worker has ended (the workers share its mark)
    if not wait_until(lambda: not suite_processes(), OUTLIVE_GRACE_S, 0.5):
        left = suite_processes()
        names = []
        for process in left:
            try:
                names.append(f"pid {process.pid} ({process.info['name']}: {' '.join(process.cmdline()[1:3])})")
            except psutil.Error:
                names.append(f"pid {process.pid} ({process.info['name']})")
        for process in left:
            try:
                process.kill()
            except psutil.Error:
                pass
        writer = session.config.get_terminal_writer()
        writer.line()
        writer.line(f"FAILED: {len(left)} process(es) started by the test session outlived it (now ended): "
                    + "; ".join(names), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED



@pytest.fixture
def tiny_server(tiny_checkpoint, tmp_path):
    """A fresh server.py on the tiny checkpoint, for a test that stops it; yields (process, base url, log path)."""
    with serving(tiny_checkpoint, tmp_path) as server:
        yield server


@pytest.fixture(scope="module")
def module_server(tiny_checkpoint, tmp_path_factory):
    """One server.py on the tiny checkpoint per test module (through `shared_server`)."""
    with serving(tiny_checkpoint, tmp_path_factory.mktemp("server")) as server:
        yield server


@pytest.fixture
def shared_server(module_server):
    """The module's server.py, healthy: for tests that leave it serving. A test may kill its tritonserver or a
    stub, but then asserts that it came back; yields (process, base url, log path), the log shared."""
    process, base, _ = module_server
    wait_http(f"{base}/api/v1/health", 120, process)
    return module_server
