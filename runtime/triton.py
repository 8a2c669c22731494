"""Find, start, watch and stop a tritonserver process.

The server comes from NVIDIA's container (`/opt/tritonserver`) or, on a plain host,
from the `nvidia-pytriton` wheel. Override with $TRITONSERVER_HOME (a folder with
`bin/tritonserver` and `backends/`).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from embcap.contract import ENSEMBLE
from runtime.threads import worker_environment

HOME_ENV = "TRITONSERVER_HOME"
NGC_HOME = Path("/opt/tritonserver")
SHM_DIR = Path("/dev/shm")
PYTHON_ENV_GLOB = "/tmp/python_env_*"  # the Python backend's own temp folders (hard-coded /tmp)
KILL_GRACE_S = 5  # stop() waits --exit-timeout-secs plus this before SIGKILL


@dataclass(frozen=True)
class TritonInstall:
    """Where a tritonserver binary, its backends and extra libraries are."""

    binary: Path
    backends: Path
    library_dirs: tuple[Path, ...] = ()


def _wheel_install() -> TritonInstall | None:
    try:
        import pytriton
    except ImportError:
        return None
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    libs = root.parent.parent / "nvidia_pytriton.libs"
    if not (root / "bin" / "tritonserver").is_file():
        return None
    return TritonInstall(root / "bin" / "tritonserver", root / "backends", (libs,))


def find_triton() -> TritonInstall:
    """$TRITONSERVER_HOME, else /opt/tritonserver, else the nvidia-pytriton wheel."""
    configured = os.environ.get(HOME_ENV)
    candidates = [Path(configured)] if configured else [NGC_HOME]
    for home in candidates:
        if (home / "bin" / "tritonserver").is_file():
            return TritonInstall(home / "bin" / "tritonserver", home / "backends", (home / "lib",))
    if configured:
        raise FileNotFoundError(f"${HOME_ENV}={configured} has no bin/tritonserver")
    install = _wheel_install()
    if install is None:
        raise FileNotFoundError("no tritonserver found: install nvidia-pytriton or set $" + HOME_ENV)
    return install


def ensure_python_stub(install: TritonInstall) -> None:
    """The wheel ships the Python-backend stub apart from the backend: put it in place."""
    stub = install.backends / "python" / "triton_python_backend_stub"
    if stub.exists():
        return
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    source = install.backends.parent / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not source.is_file():
        raise FileNotFoundError(f"no Python-backend stub for Python {version} at {source}")
    shutil.copy2(source, stub)


@dataclass(frozen=True)
class TritonOptions:
    """Command-line settings for one tritonserver process."""

    model_repository: Path
    grpc_port: int = 8001
    metrics_port: int | None = None  # None: metrics off
    gpu_metrics: bool = False  # nv_gpu_* (utilisation, memory) with the metrics, where a GPU serves
    python_thread_pool: int = 1
    exit_timeout_s: int = 30
    log_verbose: int = 0
    shm_prefix: str = field(default_factory=lambda: f"embcap_{uuid.uuid4().hex[:8]}_")

    def command(self, install: TritonInstall) -> list[str]:
        """The tritonserver argv; thread counts are kept low for the evaluator's pids limit."""
        args = [
            str(install.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={install.backends}",
            "--allow-http=false",
            "--allow-grpc=true",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--disable-auto-complete-config",
            "--strict-readiness=true",
            "--model-load-thread-count=1",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--backend-config=python,thread-pool-size={self.python_thread_pool}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--log-verbose={self.log_verbose}",
        ]
        if self.metrics_port is None:
            args.append("--allow-metrics=false")
        else:
            args += ["--allow-metrics=true", f"--allow-gpu-metrics={str(self.gpu_metrics).lower()}", "--metrics-address=127.0.0.1",
                     f"--metrics-port={self.metrics_port}"]
        return args


def triton_environment(install: TritonInstall, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment in which the Python-backend stub finds this interpreter and its packages."""
    env = worker_environment(base)
    python_lib = sysconfig.get_config_var("LIBDIR")  # the stub embeds libpython of this interpreter
    lib_dirs = [str(p) for p in install.library_dirs if p.is_dir()] + ([python_lib] if python_lib else [])
    if env.get("LD_LIBRARY_PATH"):
        lib_dirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(lib_dirs)
    # The stub ignores PYTHONPATH and takes the first python3 on PATH as its prefix.
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    return env


def shm_regions(prefix: str) -> list[Path]:
    """Shared-memory regions a server with this prefix created."""
    return [Path(p) for p in glob.glob(str(SHM_DIR / f"{prefix}*"))]


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the parent dies, so Triton is never orphaned."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class TritonProcess:
    """One tritonserver child process."""

    def __init__(self, options: TritonOptions, install: TritonInstall | None = None, log_file=None) -> None:
        self.options = options
        self.install = install or find_triton()
        self.log_file = log_file
        self.process: subprocess.Popen | None = None
        self.temp_dir: Path | None = None
        self._env_dirs_before: set[str] = set()
        self._env_dirs: set[str] | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.options.grpc_port}"

    def start(self) -> None:
        """Launch tritonserver (does not wait for readiness)."""
        ensure_python_stub(self.install)
        self.temp_dir = Path(tempfile.mkdtemp(prefix=f"{self.options.shm_prefix}tmp_"))
        env = triton_environment(self.install)
        env["TMPDIR"] = str(self.temp_dir)  # the stubs' temp files go where stop() removes them
        self._env_dirs_before = set(glob.glob(PYTHON_ENV_GLOB))
        self.process = subprocess.Popen(
            self.options.command(self.install),
            env=env,
            stdout=self.log_file or None,
            stderr=subprocess.STDOUT if self.log_file else None,
            start_new_session=True,  # a Ctrl-C to the parent reaches Triton through us, in order
            preexec_fn=_die_with_parent,
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, model: str = ENSEMBLE, timeout_s: float = 300.0) -> None:
        """Block until the server and `model` are ready; raise if it dies or times out."""
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.url)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise RuntimeError(f"tritonserver exited with code {self.process.returncode}")
                try:
                    if client.is_server_ready(client_timeout=1) and client.is_model_ready(model, client_timeout=1):
                        self._env_dirs = set(glob.glob(PYTHON_ENV_GLOB)) - self._env_dirs_before
                        return
                except Exception:
                    pass
                time.sleep(0.2)
        finally:
            client.close()
        raise TimeoutError(f"tritonserver not ready within {timeout_s:.0f} s")

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM, wait (then SIGKILL the group), and remove shared memory left behind."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s or self.options.exit_timeout_s + KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._kill_orphans()
        self.remove_shared_memory()
        self.remove_temp_dirs()
        return None if self.process is None else self.process.returncode

    def remove_temp_dirs(self) -> None:
        """Delete this server's temp folder and the backend's python_env_* folders (left after a kill)."""
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        created = self._env_dirs
        if created is None:  # never became ready: whatever appeared since the start
            created = set(glob.glob(PYTHON_ENV_GLOB)) - self._env_dirs_before
        for path in created:
            shutil.rmtree(path, ignore_errors=True)

    def _kill_orphans(self) -> None:
        # Stubs are in Triton's process group; after a SIGKILL of Triton they may linger.
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def remove_shared_memory(self) -> list[Path]:
        """Delete this server's /dev/shm regions (left behind only when it was killed)."""
        removed = shm_regions(self.options.shm_prefix)
        for path in removed:
            path.unlink(missing_ok=True)
        return removed
