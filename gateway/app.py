"""FastAPI gateway: the evaluator's /api/v1 endpoints over Triton gRPC."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.body import BodyTooLarge, read_body
from gateway.metrics import GatewayMetrics
from gateway.settings import GatewaySettings
from gateway.protocol import (BackendError, Limits, RequestError, caption_embeddings, decode_values, encode_texts,
                              to_rows)
from gateway.triton_client import TritonCaptioner

log = logging.getLogger("embcap.gateway")

# curl -d sends form-urlencoded by default; the body is still read as JSON.
ACCEPTED_CONTENT_TYPES = ("application/json", "application/x-www-form-urlencoded", "text/json")
HEALTH_PATHS = ("/api/v1/health", "/health", "/")
INFERENCE_PATHS = ("/api/v1/inference", "/api/v1/v2t")

StatusSource = Callable[[], str | None]  # returns what keeps the model from serving, or None


def _error(status: int, code: str, message: str, request_id: str = "", close: bool = False) -> JSONResponse:
    headers = {"X-Request-ID": request_id} if request_id else {}
    if close:  # part of the body is still unread: the connection cannot carry another request
        headers["Connection"] = "close"
    return JSONResponse({"error": code, "detail": message}, status_code=status, headers=headers)


def _check_content_type(request: Request) -> None:
    content_type = request.headers.get("content-type")
    if content_type is None:
        return
    media = content_type.split(";")[0].strip().lower()
    if media not in ACCEPTED_CONTENT_TYPES and not media.endswith("+json"):
        raise RequestError(415, "unsupported_media_type", f"content type {media!r} is not JSON; send application/json")


class Readiness:
    """'Can the model serve?': the supervisor's view (processes) and Triton's (server + model)."""

    def __init__(self, captioner: TritonCaptioner, status_source: StatusSource | None, ttl_s: float = 0.25):
        self.captioner = captioner
        self.status_source = status_source
        self.ttl_s = ttl_s
        self.ever_ready = False
        self._checked_at = -1.0
        self._state: tuple[bool, str | None] = (False, "not checked yet")

    async def check(self, fresh: bool = False) -> tuple[bool, str | None]:
        problem = self.status_source() if self.status_source else None
        if problem:
            return False, problem
        if fresh or time.monotonic() - self._checked_at > self.ttl_s:
            self._state = await self.captioner.readiness()
            self._checked_at = time.monotonic()
            self.ever_ready = self.ever_ready or self._state[0]
        return self._state

    async def wait(self, startup_wait_s: float) -> tuple[bool, str | None]:
        """Before the first ready moment, wait up to `startup_wait_s`; after it, answer at once.

        Once seen ready, Triton is not asked again per request (two gRPC round trips); a
        dead server then fails the inference call itself with 503, and the supervisor's
        process watch reports through `status_source`."""
        problem = self.status_source() if self.status_source else None
        if self._state[0] and not problem:
            return self._state
        state = await self.check()
        if state[0] or self.ever_ready:
            return state
        deadline = time.monotonic() + startup_wait_s
        while not state[0] and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            state = await self.check(fresh=True)
        return state


def create_app(
    settings: GatewaySettings | None = None,
    status_source: StatusSource | None = None,
    triton_metrics_url: str | None = None,
    notice_source: StatusSource | None = None,
) -> FastAPI:
    """Build the gateway app; `status_source` lets a supervisor report what keeps the model down,
    `notice_source` what is wrong while it serves (health's error field carries it)."""
    settings = settings or GatewaySettings.from_env()
    metrics = GatewayMetrics(triton_metrics_url)

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

    app = FastAPI(title="embcap gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.metrics = metrics

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, f"http_{exc.status_code}", str(exc.detail))

    async def health(request: Request) -> JSONResponse:
        ready, problem = await request.app.state.readiness.check(fresh=True)
        body = {
            "status": "healthy" if ready else "initializing",
            "initialization_status": {"model_loaded": ready,
                                      "error": problem or (notice_source() if notice_source else None)},
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    async def infer(request: Request) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        route = request.url.path
        started = time.perf_counter()
        metrics.in_flight.inc()
        try:
            # The body is read before any refusal: answering with part of it unread resets clients
            # that send all of it before reading (see gateway.body).
            body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s,
                                   settings.max_drain_bytes)
            _check_content_type(request)
            values = decode_values(body)
            ready, problem = await request.app.state.readiness.wait(settings.startup_wait_s)
            if not ready:
                raise BackendError(503, "not_ready", f"model is not ready: {problem}")
            captioner = request.app.state.captioner
            shape = await captioner.served_shape()  # the width the served model takes (cached)
            embeddings = to_rows(values, Limits(settings.max_rows, shape.embedding_dim))
            metrics.rows.observe(len(embeddings))
            texts = await caption_embeddings(embeddings, captioner, request_id)
        except RequestError as exc:
            if isinstance(exc, BackendError):
                metrics.triton_errors.labels(exc.code).inc()
            metrics.requests.labels(route, str(exc.status)).inc()
            log.warning("request failed: %s", exc.message, extra={
                "request_id": request_id, "route": route, "status": exc.status, "error": exc.code})
            return _error(exc.status, exc.code, exc.message, request_id,
                          close=isinstance(exc, BodyTooLarge) and not exc.drained)
        finally:
            metrics.in_flight.dec()
            metrics.latency.labels(route).observe(time.perf_counter() - started)
        metrics.requests.labels(route, "200").inc()
        log.info("request served", extra={
            "request_id": request_id, "route": route, "rows": len(texts),
            "ms": round(1000 * (time.perf_counter() - started), 1)})
        return Response(encode_texts(texts), media_type="application/json", headers={"X-Request-ID": request_id})

    async def prometheus(request: Request) -> Response:
        return Response(await metrics.render(), media_type="text/plain; version=0.0.4")

    for path in HEALTH_PATHS:
        app.add_api_route(path, health, methods=["GET"], include_in_schema=path == HEALTH_PATHS[0])
    for path in INFERENCE_PATHS:
        app.add_api_route(path, infer, methods=["POST"])
    app.add_api_route("/metrics", prometheus, methods=["GET"], include_in_schema=False)
    return app
