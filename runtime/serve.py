"""What the container runs: supervise the model server and serve the gateway in one process.

The gateway listens at once, answering 503 "initializing" until Triton and the
ensemble are ready. Uvicorn's "running on" banner is held back until then, because
one evaluator version takes that banner as the readiness signal. If Triton dies it
is restarted; on SIGTERM the gateway drains, Triton stops, and no shared memory is
left behind. The export options are ExportOptions' own flags (export.options).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Mapping

import uvicorn

from embcap.checkpoint import POLICIES
from export.options import ExportOptions, add_arguments, from_arguments
from gateway.app import create_app
from gateway.logs import bound_foreign_loggers, configure_logging
from gateway.settings import GatewaySettings
from runtime import CHECKPOINT_ENV
from runtime.cache_dirs import cache_environment, engine_cache_dir
from runtime.engine_profile import EngineProfile
from runtime.instance import RepositoryInUse, RepositoryLock, new_instance_id, server_id, sweep, taken_ports
from runtime.local import ROOT
from runtime.supervisor import Supervisor

log = logging.getLogger("embcap.server")
BANNER_PREFIX = "Uvicorn running on"
DEFAULT_GRACEFUL_TIMEOUT_S = 30.0  # drain time on SIGTERM (deploy/ gives the pod more than this)
EXIT_REFUSED = 2  # a port or the model repository belongs to another server: nothing was started
EXIT_SUPERVISOR_DIED = 1  # the supervisor of tritonserver stopped: the container or pod must restart us
LOOPBACK = "127.0.0.1"  # Triton listens only here


def default_repository(port: int) -> Path:
    """Where the export writes unless told: one folder per gateway port, so two servers never share one."""
    return Path("/tmp/embcap") / str(port) / "model_repository"


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="server.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path(env(CHECKPOINT_ENV, ROOT / "models" / "default")))
    parser.add_argument("--model-repository", type=Path, default=env("EMBCAP_MODEL_REPOSITORY"),
                        help="where the export writes (must be writable) or, with --skip-export, what to serve "
                             "(default /tmp/embcap/PORT/model_repository); one server at a time (a lock beside it)")
    parser.add_argument("--skip-export", action="store_true", help="serve --model-repository as it is")
    parser.add_argument("--keep-repository", action="store_true", help="keep the exported repository on exit")
    parser.add_argument("--fresh-export", action="store_true",
                        help="export even when the export cache ($EMBCAP_CACHE_DIR/exports) holds an export of the "
                             "same checkpoint files, options and code (a cold start, as the evaluator's)")
    parser.add_argument("--bind", default=env("EMBCAP_BIND", "0.0.0.0"), help="gateway address")
    # String defaults: argparse converts them only when the flag is absent, so a foreign
    # EMBCAP_PORT (Kubernetes' service link "tcp://10.0.0.1:8000" for a Service named embcap)
    # cannot stop a server that is given --port.
    parser.add_argument("--port", type=int, default=env("EMBCAP_PORT", "8000"))
    parser.add_argument("--grpc-port", type=int, default=env("EMBCAP_GRPC_PORT"),
                        help="Triton's gRPC port on 127.0.0.1 (default: --port + 1)")
    parser.add_argument("--metrics-port", type=int, default=None)
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds for Triton to load the models")
    parser.add_argument("--graceful-timeout", type=float, default=DEFAULT_GRACEFUL_TIMEOUT_S,
                        help="seconds to drain requests on SIGTERM")
    parser.add_argument("--on-unusable-gpu", choices=POLICIES, default=env("EMBCAP_ON_UNUSABLE_GPU") or None,
                        help="a GPU is visible but torch cannot use it: serve on the CPU, refuse (stay unhealthy), "
                             "or auto (serve on the CPU if the decoder answers in time there); default: the "
                             "checkpoint's on_unusable_gpu (auto)")
    add_arguments(parser.add_argument_group("export options (passed to python -m export)"))
    args = parser.parse_args(argv)
    if args.grpc_port is None:
        args.grpc_port = args.port + 1
    if args.model_repository is None:
        args.model_repository = default_repository(args.port)
    return args


def export_options(args: argparse.Namespace, environ: Mapping[str, str]) -> ExportOptions:
    """The export options server.py was given; the TensorRT engine folder defaults to the sandbox's cache."""
    configured = engine_cache_dir(environ)
    if configured and not hasattr(args, "engine_cache_dir"):
        return from_arguments(args, engine_cache_dir=configured)
    return from_arguments(args)


async def serve(args: argparse.Namespace, lock: RepositoryLock | None = None) -> int:
    """Serve until SIGTERM (exit code 0) or until the supervisor stops, which it never should (1)."""
    banner = HeldBanner()
    logging.getLogger("uvicorn.error").addFilter(banner)
    url = f"http://{args.bind}:{args.port}"
    instance_id = new_instance_id()
    supervisor = Supervisor(args, export_options(args, os.environ), on_ready=lambda: banner.release(url),
                            instance_id=instance_id, lock=lock)
    settings = GatewaySettings.from_env(triton_url=f"{LOOPBACK}:{args.grpc_port}",
                                        triton_server_id=server_id(instance_id))
    triton_metrics = f"http://{LOOPBACK}:{args.metrics_port}/metrics" if args.metrics_port else None
    app = create_app(settings, status_source=supervisor.status, triton_metrics_url=triton_metrics,
                     notice_source=lambda: supervisor.notice, liveness_source=supervisor.liveness,
                     profile_source=EngineProfile(lambda: supervisor.triton and supervisor.triton.temp_dir))
    supervisor.on_devices = app.state.metrics.set_model_devices
    config = uvicorn.Config(app, host=args.bind, port=args.port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=args.graceful_timeout, **settings.uvicorn_options())
    bound_foreign_loggers()  # uvicorn has configured its loggers: bound their lines, hold back floods
    server = GatewayServer(config)
    task = asyncio.create_task(supervisor.run())

    def supervisor_ended(ended: asyncio.Task) -> None:
        if ended.cancelled():
            return
        supervisor.fail(f"the Triton supervisor stopped: {ended.exception()!r}; exiting so that the container "
                        "is restarted")
        server.should_exit = True

    task.add_done_callback(supervisor_ended)
    try:
        await server.serve()  # returns after SIGTERM/SIGINT once in-flight requests are done
    finally:
        task.remove_done_callback(supervisor_ended)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await supervisor.stop()
        log.info("stopped")
    return EXIT_SUPERVISOR_DIED if supervisor.failure else 0


def claim(args: argparse.Namespace) -> RepositoryLock:
    """Check the ports, lock the model repository and sweep what a killed predecessor left there;
    raise RepositoryInUse (or PortsTaken) with what to do instead."""
    ports = {"HTTP": (args.bind, args.port), "gRPC": (LOOPBACK, args.grpc_port)}
    if args.metrics_port:
        ports["metrics"] = (LOOPBACK, args.metrics_port)
    if len({port for _, port in ports.values()}) < len(ports):
        raise PortsTaken(f"the ports must differ: {', '.join(f'{k} {p}' for k, (_, p) in ports.items())}")
    problems = taken_ports(ports)
    if problems:
        raise PortsTaken("; ".join(problems) + ": stop that server or choose free ports (--port, --grpc-port, "
                         "--metrics-port; make serve PORT=... GRPC_PORT=...)")
    lock = RepositoryLock.acquire(args.model_repository)
    if lock.predecessor is not None:
        removed = sweep(lock.predecessor, None if args.skip_export else lock.repository)
        log.warning("swept what a killed predecessor (pid %d) left: %s", lock.predecessor.pid,
                    ", ".join(removed) or "nothing")
    return lock


class PortsTaken(RuntimeError):
    """A port this server needs is in use (or two of them are the same)."""


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    args = parse_args(argv)
    try:
        lock = claim(args)
    except (PortsTaken, RepositoryInUse) as exc:
        log.error("not starting: %s", exc)
        return EXIT_REFUSED
    try:
        os.environ.update(cache_environment())  # /app/cache when the sandbox has one; inherited by the children
        return asyncio.run(serve(args, lock))
    finally:
        lock.release()
