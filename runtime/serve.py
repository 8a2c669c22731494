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
from gateway.logs import configure_logging
from gateway.settings import GatewaySettings
from runtime.cache_dirs import cache_environment, engine_cache_dir
from runtime.local import ROOT
from runtime.supervisor import Supervisor

log = logging.getLogger("embcap.server")
BANNER_PREFIX = "Uvicorn running on"
DEFAULT_GRACEFUL_TIMEOUT_S = 30.0  # drain time on SIGTERM (deploy/ gives the pod more than this)


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
    parser = argparse.ArgumentParser(prog="server.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path(env("EMBCAP_CHECKPOINT", ROOT / "models" / "default")))
    parser.add_argument("--model-repository", type=Path,
                        default=Path(env("EMBCAP_MODEL_REPOSITORY", "/tmp/embcap/model_repository")),
                        help="where the export writes (must be writable) or, with --skip-export, what to serve")
    parser.add_argument("--skip-export", action="store_true", help="serve --model-repository as it is")
    parser.add_argument("--keep-repository", action="store_true", help="keep the exported repository on exit")
    parser.add_argument("--bind", default=env("EMBCAP_BIND", "0.0.0.0"), help="gateway address")
    # String defaults: argparse converts them only when the flag is absent, so a foreign
    # EMBCAP_PORT (Kubernetes' service link "tcp://10.0.0.1:8000" for a Service named embcap)
    # cannot stop a server that is given --port.
    parser.add_argument("--port", type=int, default=env("EMBCAP_PORT", "8000"))
    parser.add_argument("--grpc-port", type=int, default=env("EMBCAP_GRPC_PORT", "8001"))
    parser.add_argument("--metrics-port", type=int, default=None)
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds for Triton to load the models")
    parser.add_argument("--graceful-timeout", type=float, default=DEFAULT_GRACEFUL_TIMEOUT_S,
                        help="seconds to drain requests on SIGTERM")
    parser.add_argument("--on-unusable-gpu", choices=POLICIES, default=env("EMBCAP_ON_UNUSABLE_GPU") or None,
                        help="a GPU is visible but torch cannot use it: serve on the CPU, refuse (stay unhealthy), "
                             "or auto (serve on the CPU if the decoder answers in time there); default: the "
                             "checkpoint's on_unusable_gpu (auto)")
    add_arguments(parser.add_argument_group("export options (passed to python -m export)"))
    return parser.parse_args(argv)


def export_options(args: argparse.Namespace, environ: Mapping[str, str]) -> ExportOptions:
    """The export options server.py was given; the TensorRT engine folder defaults to the sandbox's cache."""
    configured = engine_cache_dir(environ)
    if configured and not hasattr(args, "engine_cache_dir"):
        return from_arguments(args, engine_cache_dir=configured)
    return from_arguments(args)


async def serve(args: argparse.Namespace) -> None:
    banner = HeldBanner()
    logging.getLogger("uvicorn.error").addFilter(banner)
    url = f"http://{args.bind}:{args.port}"
    supervisor = Supervisor(args, export_options(args, os.environ), on_ready=lambda: banner.release(url))
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
    asyncio.run(serve(args))
    return 0
