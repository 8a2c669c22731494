"""What the container runs: export the checkpoint, supervise tritonserver, serve the gateway.

The gateway listens at once, answering 503 "initializing" until Triton and the
captioner are ready. Uvicorn's "running on" banner is held back until then, because
one evaluator version takes that banner as the readiness signal. If Triton dies it
is restarted; on SIGTERM the gateway drains, Triton stops, and no shared memory is
left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

# Before numpy loads: OpenBLAS otherwise starts one thread per CPU here and in the export
# (151 threads on a 64-CPU host; the evaluator's pids_limit is 100).
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import psutil
import uvicorn

from embcap.cache_dirs import cache_environment, engine_cache_args
from embcap.gpu_probe import POLICIES, ProbeReport
from embcap.triton_server import TritonOptions, TritonProcess
from export.templates import parse_model_config
from gateway.app import create_app
from gateway.logs import configure_logging
from gateway.settings import GatewaySettings

ROOT = Path(__file__).resolve().parent
log = logging.getLogger("embcap.server")
BANNER_PREFIX = "Uvicorn running on"
MODEL_RUNTIMES = {"decoder": "torch", "projector": "onnxruntime"}  # which runtime puts each model on a GPU


class HeldBanner(logging.Filter):
    """Drops uvicorn's start-up banner until `release()` is called, then logs it."""

    def __init__(self) -> None:
        super().__init__()
        self.released = False
        self.held: logging.LogRecord | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.released and str(record.msg).startswith(BANNER_PREFIX):
            self.held = record
            return False
        return True

    def release(self, url: str) -> None:
        if self.released:
            return
        self.released = True
        logging.getLogger("uvicorn.error").info("%s %s (Press CTRL+C to quit)", BANNER_PREFIX, url)


def python_stubs(triton_pid: int) -> dict[int, str]:
    """Python-backend stub processes of a tritonserver: pid -> model name."""
    stubs = {}
    for child in psutil.Process(triton_pid).children():
        try:
            if child.name() == "triton_python_backend_stub":
                stubs[child.pid] = Path(child.cmdline()[1]).parent.parent.name
        except (psutil.NoSuchProcess, IndexError):
            continue
    return stubs


def model_devices(repository: Path, report: ProbeReport) -> dict[str, str]:
    """Model -> "cuda" or "cpu": GPU instances whose runtime the probe found usable run on cuda."""
    devices = {}
    for path in sorted(repository.glob("*/config.pbtxt")):
        config = parse_model_config(path.read_text(), str(path))
        if not config.instance_group:
            continue  # an ensemble runs nowhere itself
        gpu = any(group.kind == group.KIND_GPU for group in config.instance_group)
        runtime = MODEL_RUNTIMES.get(config.name)
        devices[config.name] = "cuda" if gpu and (runtime is None or report.usable(runtime)) else "cpu"
    return devices


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class GatewayServer(uvicorn.Server):
    """Uvicorn re-raises SIGTERM after draining, which would kill us before Triton is
    stopped; here the signal only starts the drain and `serve()` returns normally."""

    @contextlib.contextmanager
    def capture_signals(self):
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


class Supervisor:
    """Probes the GPU and exports the checkpoint, then keeps one tritonserver running and ready."""

    def __init__(self, args: argparse.Namespace, on_ready, on_devices=lambda devices: None) -> None:
        self.args = args
        self.on_ready = on_ready
        self.on_devices = on_devices
        self.problem: str | None = "starting: exporting the model repository"
        self.notice: str | None = None  # reported in health while serving (a GPU that cannot be used)
        self.triton: TritonProcess | None = None
        self.export_process: asyncio.subprocess.Process | None = None
        self.restarts = 0

    def status(self) -> str | None:
        return self.problem

    def notice_text(self) -> str | None:
        return self.notice

    async def _probe(self) -> tuple[ProbeReport | None, dict | None]:
        """Run `python -m embcap.gpu_probe` (torch and CUDA stay out of this process): (report, decision)."""
        command = [sys.executable, "-m", "embcap.gpu_probe", "--json"]
        if (Path(self.args.checkpoint) / "caption_model.json").is_file():
            command += ["--checkpoint", str(self.args.checkpoint)]
        if self.args.on_unusable_gpu:
            command += ["--policy", self.args.on_unusable_gpu]
        process = await asyncio.create_subprocess_exec(*command, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await process.communicate()
        try:
            answer = json.loads(stdout)
        except json.JSONDecodeError:
            message = (stderr or stdout).decode(errors="replace").strip().splitlines()[-1:]
            self.notice = f"GPU probe failed (exit {process.returncode}): {' '.join(message)}"
            log.error(self.notice)
            return None, None
        report, decision = ProbeReport.from_dict(answer["report"]), answer["decision"]
        if decision["line"]:
            (log.warning if decision["serve"] else log.error)(decision["line"])
        else:
            log.info("GPU probe: %s", answer["summary"])
        return report, decision

    async def _export(self) -> bool:
        if self.args.skip_export:
            return True
        command = [sys.executable, "-m", "export", str(self.args.checkpoint), "--out", str(self.args.model_repository),
                   *self.args.export_arg]
        log.info("exporting: %s", " ".join(command))
        self.export_process = await asyncio.create_subprocess_exec(*command, cwd=ROOT, stderr=asyncio.subprocess.PIPE)
        _, stderr = await self.export_process.communicate()
        if self.export_process.returncode != 0:
            message = stderr.decode(errors="replace").strip().splitlines()[-5:]
            self.problem = "export failed: " + " | ".join(message)
            log.error(self.problem)
            return False
        return True

    async def run(self) -> None:
        probe = asyncio.create_task(self._probe())  # alongside the export: both import torch
        exported = await self._export()
        report, decision = await probe
        if decision is not None and not decision["serve"]:
            self.problem = decision["line"]
            return  # stay up and unhealthy: health answers 503 with the reason
        if decision is not None:
            self.notice = decision["line"]
        if not exported:
            return
        if report is not None:
            devices = model_devices(Path(self.args.model_repository), report)
            log.info("model devices: %s", ", ".join(f"{m} on {d}" for m, d in devices.items()))
            self.on_devices(devices)
        options = TritonOptions(
            model_repository=Path(self.args.model_repository).resolve(), grpc_port=self.args.grpc_port,
            metrics_port=self.args.metrics_port,
        )
        while True:
            self.triton = TritonProcess(options)
            self.problem = "starting: loading models in tritonserver"
            self.triton.start()
            try:
                await asyncio.to_thread(self.triton.wait_ready, "captioner", self.args.ready_timeout)
            except (RuntimeError, TimeoutError) as exc:
                self.problem = f"tritonserver failed to start: {exc}"
                log.error(self.problem)
            else:
                stubs = python_stubs(self.triton.process.pid)
                self.problem = None
                log.info("tritonserver ready (restarts so far: %d)", self.restarts,
                         extra={"stubs": sorted(stubs.values())})
                self.on_ready()
                self.problem = await self._watch(stubs)
                log.error(self.problem)
            await asyncio.to_thread(self.triton.stop, 5)
            self.restarts += 1
            await asyncio.sleep(min(5.0, 0.5 * self.restarts))

    async def _watch(self, stubs: dict[int, str]) -> str:
        """Return once tritonserver or one of its Python-backend stubs has died.

        Triton keeps reporting a model ready after its stub died, while every request
        to it fails, so the stubs are watched here as processes."""
        while True:
            await asyncio.sleep(0.2)
            if not self.triton.alive():
                return f"tritonserver exited with code {self.triton.process.returncode}; restarting"
            for pid, model in stubs.items():
                if not _running(pid):
                    return f"the Python-backend stub of model '{model}' died; restarting tritonserver"

    async def stop(self) -> None:
        if self.export_process is not None and self.export_process.returncode is None:
            self.export_process.kill()
        if self.triton is not None:
            await asyncio.to_thread(self.triton.stop)
        if not self.args.skip_export and not self.args.keep_repository:
            shutil.rmtree(self.args.model_repository, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path(env("EMBCAP_CHECKPOINT", ROOT / "models" / "default")))
    parser.add_argument("--model-repository", type=Path,
                        default=Path(env("EMBCAP_MODEL_REPOSITORY", "/tmp/embcap/model_repository")),
                        help="where the export writes (must be writable) or, with --skip-export, what to serve")
    parser.add_argument("--skip-export", action="store_true", help="serve --model-repository as it is")
    parser.add_argument("--keep-repository", action="store_true", help="keep the exported repository on exit")
    parser.add_argument("--export-arg", action="append", default=[],
                        help="extra argument for `python -m export` (repeatable), e.g. --export-arg=--max-batch-size=32")
    parser.add_argument("--bind", default=env("EMBCAP_BIND", "0.0.0.0"), help="gateway address")
    parser.add_argument("--port", type=int, default=int(env("EMBCAP_PORT", "8000")))
    parser.add_argument("--grpc-port", type=int, default=int(env("EMBCAP_GRPC_PORT", "8001")))
    parser.add_argument("--metrics-port", type=int, default=None)
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds for Triton to load the models")
    parser.add_argument("--graceful-timeout", type=float, default=30.0, help="seconds to drain requests on SIGTERM")
    parser.add_argument("--on-unusable-gpu", choices=POLICIES, default=env("EMBCAP_ON_UNUSABLE_GPU") or None,
                        help="a GPU is visible but torch cannot use it: serve on the CPU, refuse (stay unhealthy), "
                             "or auto (serve on the CPU if the decoder answers in time there); default: the "
                             "checkpoint's on_unusable_gpu (auto)")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    banner = HeldBanner()
    logging.getLogger("uvicorn.error").addFilter(banner)
    url = f"http://{args.bind}:{args.port}"
    supervisor = Supervisor(args, on_ready=lambda: banner.release(url))
    settings = GatewaySettings.from_env(triton_url=f"127.0.0.1:{args.grpc_port}")
    triton_metrics = f"http://127.0.0.1:{args.metrics_port}/metrics" if args.metrics_port else None
    app = create_app(settings, status_source=supervisor.status, triton_metrics_url=triton_metrics,
                     notice_source=supervisor.notice_text)
    supervisor.on_devices = app.state.metrics.set_model_devices
    config = uvicorn.Config(app, host=args.bind, port=args.port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=args.graceful_timeout)
    server = GatewayServer(config)
    task = asyncio.create_task(supervisor.run())
    try:
        await server.serve()  # returns after SIGTERM/SIGINT once in-flight requests are done
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await supervisor.stop()
        log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    args = parse_args(argv)
    os.environ.update(cache_environment())  # /app/cache when the sandbox has one; inherited by the children
    args.export_arg += engine_cache_args(os.environ, args.export_arg)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
