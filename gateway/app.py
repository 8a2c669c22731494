"""FastAPI gateway: the evaluator's /api/v1 endpoints over Triton gRPC."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from embcap.load_profile import LoadProfile
from gateway.admission import Admission, OverCapacity
from gateway.body import BodyTooLarge, MemoryBudget, held_size, read_body
from gateway.headers import check_body_headers, request_id
from gateway.metrics import GatewayMetrics
from gateway.protocol import (BackendError, Limits, RequestError, caption_embeddings, decode_values, encode_texts,
                              parse_embeddings, to_rows)
from gateway.readiness import Readiness, StatusSource
from gateway.settings import GatewaySettings
from gateway.triton_client import TritonCaptioner

log = logging.getLogger("embcap.gateway")

HEALTH_PATHS = ("/api/v1/health", "/health", "/")
INFERENCE_PATHS = ("/api/v1/inference", "/api/v1/v2t")
MAX_DETAIL_CHARS = 512  # an error's detail (it may quote the request); the log line is bounded too


def _error(status: int, code: str, message: str, request_id: str = "", close: bool = False,
           headers: dict[str, str] | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if request_id:
        headers["X-Request-ID"] = request_id
    if close:  # part of the body is still unread: the connection cannot carry another request
        headers["Connection"] = "close"
    if len(message) > MAX_DETAIL_CHARS:
        message = message[:MAX_DETAIL_CHARS] + "...(cut)"
    return JSONResponse({"error": code, "detail": message}, status_code=status, headers=headers)


def create_app(
    settings: GatewaySettings | None = None,
    status_source: StatusSource | None = None,
    triton_metrics_url: str | None = None,
    notice_source: StatusSource | None = None,
    liveness_source: StatusSource | None = None,
    profile_source: Callable[[], LoadProfile | None] | None = None,
) -> FastAPI:
    """Build the gateway app; `status_source` lets a supervisor report what keeps the model down,
    `notice_source` what is wrong while it serves (health's error field carries it), `liveness_source`
    why the process should be restarted (then /metrics, the liveness probe's path, answers 503),
    `profile_source` what answering rows costs the decoder (admission judges its queue with it)."""
    settings = settings or GatewaySettings.from_env()
    metrics = GatewayMetrics(triton_metrics_url)
    budget = MemoryBudget(settings.max_buffered_bytes)
    admission = Admission(settings.request_timeout_s, profile_source=profile_source)
    # A body above settings.inline_parse_bytes is parsed here, off the event loop; a pool of its own, as small as
    # asked (threads count against the container's pids limit, and the default pool grows with the CPU count).
    # A smaller one is parsed on the loop: the parse holds the interpreter's lock either way (orjson, numpy), so
    # the thread spared the loop nothing at that size and cost two thread wake-ups per request.
    parser = ThreadPoolExecutor(max_workers=settings.parse_threads, thread_name_prefix="embcap-parse")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        captioner = TritonCaptioner(settings.triton_url, settings.model, settings.request_timeout_s,
                                    settings.health_timeout_s, settings.triton_server_id)
        app.state.captioner = captioner
        app.state.readiness = Readiness(captioner, status_source)
        try:
            yield
        finally:
            await captioner.close()
            await metrics.close()
            parser.shutdown(wait=False, cancel_futures=True)

    # No trailing-slash redirects: their Location would be built from the client's Host header.
    app = FastAPI(title="embcap gateway", lifespan=lifespan, docs_url=None, redoc_url=None, redirect_slashes=False)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.admission = admission

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, f"http_{exc.status_code}", str(exc.detail), headers=exc.headers)  # 405: Allow

    async def health(request: Request) -> JSONResponse:
        ready, problem = await request.app.state.readiness.check(fresh=True)
        body = {
            "status": "healthy" if ready else "initializing",
            "initialization_status": {"model_loaded": ready,
                                      "error": problem or (notice_source() if notice_source else None)},
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    async def in_parser(function, *args):
        return await asyncio.get_running_loop().run_in_executor(parser, function, *args)

    async def caption(request: Request, request_id: str) -> list[str]:
        async with budget.reserve(held_size(request, settings.max_body_bytes), settings.buffer_wait_s):
            # The body is read before any refusal: answering with part of it unread resets clients
            # that send all of it before reading (see gateway.body).
            body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s,
                                   settings.max_drain_bytes)
            check_body_headers(request.headers)
            admission.check(1)  # a full queue refuses at once, before the parse
            captioner = request.app.state.captioner
            known = captioner.known_shape
            if known is not None:  # the served width is known (every request after the first): one parse
                limits = Limits(settings.max_rows, known.embedding_dim)
                embeddings = parse_embeddings(body, limits) if len(body) <= settings.inline_parse_bytes \
                    else await in_parser(parse_embeddings, body, limits)
            else:
                values = await in_parser(decode_values, body, None)
            ready, problem = await request.app.state.readiness.wait(settings.startup_wait_s)
            if not ready:
                raise BackendError(503, "not_ready", f"model is not ready: {problem}")
            if known is None:
                shape = await captioner.served_shape()  # the width the served model takes (read once)
                embeddings = await in_parser(to_rows, values, Limits(settings.max_rows, shape.embedding_dim))
                del values
            del body
        request.state.expected_s = admission.check(len(embeddings)).expected_s
        metrics.rows.observe(len(embeddings))
        admission.started(len(embeddings))
        answered = False
        try:
            texts = await caption_embeddings(embeddings, captioner, request_id)
            answered = True
        finally:
            admission.finished(len(embeddings), answered)
        return texts

    def finished(route: str, started: float) -> float:
        """The request's seconds, counted in the latency histogram; it is no longer in flight."""
        elapsed = time.perf_counter() - started
        metrics.in_flight.dec()
        metrics.latency.labels(route).observe(elapsed)
        return elapsed

    async def infer(request: Request) -> Response:
        rid, replaced = request_id(request.headers)
        route = request.scope["path"]  # one of INFERENCE_PATHS (no URL object built per request)
        started = time.perf_counter()
        metrics.in_flight.inc()
        admission.entered()
        try:
            texts = await caption(request, rid)
        except RequestError as exc:
            finished(route, started)
            if isinstance(exc, BackendError):
                metrics.triton_errors.labels(exc.code).inc()
            metrics.requests.labels(route, str(exc.status)).inc()
            log.warning("request failed: %s", exc.message, extra={
                "request_id": rid, "route": route, "status": exc.status, "error": exc.code,
                **({"request_id_replaced": True} if replaced else {})})
            unread = (isinstance(exc, BodyTooLarge) and not exc.drained) or exc.code == "busy"
            retry = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, OverCapacity) else \
                {"Retry-After": "1"} if exc.code in ("busy", "over_capacity") else None
            return _error(exc.status, exc.code, exc.message, rid, close=unread, headers=retry)
        except BaseException:
            finished(route, started)
            raise
        finally:
            admission.left()  # in every branch, before the answer goes out

        async def served() -> None:
            # Run once the answer is written, in the same turn of the event loop (nothing else runs between):
            # the counters and the log line (a write to stderr) stay off the request's own latency.
            elapsed = finished(route, started)
            metrics.requests.labels(route, "200").inc()
            log.info("request served", extra={
                "request_id": rid, "route": route, "rows": len(texts), "ms": round(1000 * elapsed, 1),
                **expected(request), **({"request_id_replaced": True} if replaced else {})})

        return Response(encode_texts(texts), media_type="application/json", headers={"X-Request-ID": rid},
                        background=BackgroundTask(served))

    def expected(request: Request) -> dict:
        """The admission's estimate for a served request, for its log line (bench.admission compares)."""
        seconds = getattr(request.state, "expected_s", None)
        return {} if seconds is None else {"expected_s": round(seconds, 2)}

    async def prometheus(request: Request) -> Response:
        problem = liveness_source() if liveness_source else None
        if problem:  # the liveness probe's path: a dead watchdog restarts the pod
            return PlainTextResponse(f"# not live: {problem}\n", status_code=503)
        return Response(await metrics.render(), media_type="text/plain; version=0.0.4")

    for path in HEALTH_PATHS:
        app.add_api_route(path, health, methods=["GET"], include_in_schema=path == HEALTH_PATHS[0])
    for path in INFERENCE_PATHS:  # Starlette's plain route: FastAPI's per-request dependency machinery
        app.add_route(path, infer, methods=["POST"])  # (unused here: the handler reads the body itself) costs ~0.2 ms
    app.add_api_route("/metrics", prometheus, methods=["GET"], include_in_schema=False)
    return app
