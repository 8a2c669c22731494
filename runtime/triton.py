"""Start, watch and stop a tritonserver process (runtime.triton_install finds it)."""

from __future__ import annotations

import asyncio
import glob
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from embcap.contract import ENSEMBLE
from runtime.instance import SHM_DIR, new_instance_id, server_id, shm_prefix
from runtime.lifetime import dies_with_this_process, start_reaper
from runtime.python_env import PythonEnvClaim
from runtime.triton_install import TritonInstall, ensure_python_stub, find_triton, triton_environment

KILL_GRACE_S = 5  # stop() waits --exit-timeout-secs plus this before SIGKILL
# Triton's gRPC API groups that neither the gateway, the supervisor, the bench nor the tests call
# (they use health, metadata, model-config, inference and statistics): registering shared memory,
# loading models, changing log or trace settings need RESTRICTED_HEADER with the server's key.
RESTRICTED = ("shared-memory", "model-repository", "logging", "trace")
RESTRICTED_KEY = "embcap-admin-key"
RESTRICTED_HEADER = f"triton-grpc-protocol-{RESTRICTED_KEY}"  # the gRPC header a client sends (Triton adds the prefix)
SHM_MODE = 0o600  # the Python backend makes its /dev/shm regions 0644 whatever the umask: this user's only


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
    instance_id: str = field(default_factory=new_instance_id)  # runtime.instance: the server's identity
    # The gRPC API groups the stack never calls: closed to any client without this key (see RESTRICTED).
    restricted_key: str = field(default_factory=lambda: secrets.token_hex(16), repr=False)

    @property
    def server_id(self) -> str:
        """What this Triton answers as its name in the server metadata (`--id`)."""
        return server_id(self.instance_id)

    @property
    def shm_prefix(self) -> str:
        return shm_prefix(self.instance_id)

    def command(self, install: TritonInstall) -> list[str]:
        """The tritonserver argv; thread counts are kept low for the evaluator's pids limit."""
        args = [
            str(install.binary),
            f"--id={self.server_id}",
            f"--model-repository={self.model_repository}",
            f"--backend-directory={install.backends}",
            "--allow-http=false",
            "--allow-grpc=true",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            f"--grpc-restricted-protocol={','.join(RESTRICTED)}:{RESTRICTED_KEY}={self.restricted_key}",
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
            args += ["--allow-metrics=true", f"--allow-gpu-metrics={str(self.gpu_metrics).lower()}",
                     "--metrics-address=127.0.0.1",
                     f"--metrics-port={self.metrics_port}"]
        return args


def shm_regions(prefix: str) -> list[Path]:
    """Shared-memory regions a server with this prefix created."""
    return [Path(p) for p in glob.glob(str(SHM_DIR / f"{prefix}*"))]


class TritonProcess:
    """One tritonserver child process."""

    def __init__(self, options: TritonOptions, install: TritonInstall | None = None, log_file=None) -> None:
        """`log_file`: a file for Triton's output, subprocess.PIPE (read `process.stdout`), or None (ours)."""
        self.options = options
        self.install = install or find_triton()
        self.log_file = log_file
        self.process: subprocess.Popen | None = None
        self.reaper: subprocess.Popen | None = None  # ends the stubs when tritonserver ends (runtime.lifetime)
        self.temp_dir: Path | None = None
        self._env_dirs: set[str] = set()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.options.grpc_port}"

    def start(self) -> None:
        """Launch tritonserver and take its Python backend's temp folder (about a second; runtime.python_env);
        does not wait for readiness."""
        with PythonEnvClaim() as claim:
            self.launch()
            self.take_python_env(claim)

    def launch(self) -> None:
        """Launch tritonserver, on this thread: it is killed when the thread that launched it ends
        (dies_with_this_process). Only under a PythonEnvClaim, then take_python_env(); start() does both."""
        ensure_python_stub(self.install)
        self.temp_dir = Path(tempfile.mkdtemp(prefix=f"{self.options.shm_prefix}tmp_"))
        env = triton_environment(self.install)
        env["TMPDIR"] = str(self.temp_dir)  # the stubs' temp files go where stop() removes them
        self.process = subprocess.Popen(
            self.options.command(self.install),
            env=env,
            stdout=self.log_file,
            stderr=subprocess.STDOUT if self.log_file is not None else None,
            start_new_session=True,  # a Ctrl-C to the parent reaches Triton through us, in order; its stubs
            preexec_fn=dies_with_this_process(),  # are in its process group, which the reaper ends with it
        )
        self.reaper = start_reaper(self.process)

    async def start_in_loop(self) -> None:
        """start() from an event loop: the claim is waited for in threads, tritonserver launched on the loop's."""
        claim = PythonEnvClaim()
        await asyncio.to_thread(claim.acquire)
        try:
            self.launch()
            await asyncio.to_thread(self.take_python_env, claim)
        finally:
            claim.release()

    def take_python_env(self, claim: PythonEnvClaim) -> None:
        """Wait (under `claim`, taken before launch()) until the Python backend has made its folder; it is ours."""
        self._env_dirs = claim.wait(self.alive)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, model: str = ENSEMBLE, timeout_s: float = 300.0) -> None:
        """Block until this server (its `--id` read back) and `model` are ready; raise if it dies or
        times out. Another Triton answering on the port is never taken for this one."""
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.url)
        deadline = time.monotonic() + timeout_s
        foreign = None
        try:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise RuntimeError(f"tritonserver exited with code {self.process.returncode}")
                try:
                    name = client.get_server_metadata(client_timeout=1).name
                    if name != self.options.server_id:
                        foreign = name
                    elif client.is_server_ready(client_timeout=1) and client.is_model_ready(model, client_timeout=1):
                        self.protect_shared_memory()
                        return
                except Exception:
                    pass
                time.sleep(0.2)
        finally:
            client.close()
        if foreign is not None:
            raise TimeoutError(f"another Triton (id {foreign!r}) answers on gRPC port {self.options.grpc_port}, "
                               f"not this server's ({self.options.server_id!r})")
        raise TimeoutError(f"tritonserver not ready within {timeout_s:.0f} s")

    @property
    def python_env_dirs(self) -> list[str]:
        """The Python backend's folders this server created (known once start() returned)."""
        return sorted(self._env_dirs)

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
        self._wait_for_reaper()
        self.remove_shared_memory()
        self.remove_temp_dirs()
        return None if self.process is None else self.process.returncode

    def remove_temp_dirs(self) -> None:
        """Delete this server's temp folder and the backend's python_env_* folders (left after a kill)."""
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        for path in self._env_dirs:  # this server's alone: another's would make that one abort at its exit
            shutil.rmtree(path, ignore_errors=True)

    def _kill_orphans(self) -> None:
        # Stubs are in Triton's process group; after a SIGKILL of Triton they may linger.
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _wait_for_reaper(self) -> None:
        # It ends as soon as tritonserver has; wait for it so that it does not stay a zombie of ours.
        if self.reaper is not None:
            try:
                self.reaper.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                self.reaper.kill()
                self.reaper.wait()

    def protect_shared_memory(self) -> None:
        """Make this server's /dev/shm regions readable and writable by this user only (the stubs and
        Triton hold them open already; the mode keeps other users out)."""
        for path in shm_regions(self.options.shm_prefix):
            try:
                path.chmod(SHM_MODE)
            except FileNotFoundError:
                continue

    def remove_shared_memory(self) -> list[Path]:
        """Delete this server's /dev/shm regions (left behind only when it was killed)."""
        removed = shm_regions(self.options.shm_prefix)
        for path in removed:
            path.unlink(missing_ok=True)
        return removed
