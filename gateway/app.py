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

from gateway.settings import GatewaySettings
from gateway.triton_client import TritonCaptioner
from inference import Limits, RequestError, caption_embeddings, encode_texts, parse_embeddings

log = logging.getLogger("embcap.gateway")

# curl -d sends form-urlencoded by default; the body is still read as JSON.
ACCEPTED_CONTENT_TYPES = ("application/json", "application/x-www-form-urlencoded", "text/json")

StatusSource = Callable[[], str | None]  # returns a start-up error, or None when all is well


def _error(status: int, code: str, message: str, request_id: str = "") -> JSONResponse:
    headers = {"X-Request-ID": request_id} if request_id else None
    return JSONResponse({"error": code, "detail": message}, status_code=status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, "invalid_content_length", "Content-Length is not a number")
        if int(declared) > limit:
            raise RequestError(413, "body_too_large", f"body of {declared} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, "body_too_large", f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_content_type(request: Request) -> None:
    content_type = request.headers.get("content-type")
    if content_type is None:
        return
    media = content_type.split(";")[0].strip().lower()
    if media not in ACCEPTED_CONTENT_TYPES and not media.endswith("+json"):
        raise RequestError(415, "unsupported_media_type", f"content type {media!r} is not JSON; send application/json")


class Readiness:
    """Answers 'can the model serve?' from Triton, caching the answer briefly."""

    def __init__(self, captioner: TritonCaptioner, status_source: StatusSource | None, ttl_s: float = 0.25):
        self.captioner = captioner
        self.status_source = status_source
        self.ttl_s = ttl_s
        self._checked_at = -1.0
        self._state: tuple[bool, str | None] = (False, "not checked yet")

    async def check(self, fresh: bool = False) -> tuple[bool, str | None]:
        problem = self.status_source() if self.status_source else None
        if problem:
            return False, problem
        if fresh or time.monotonic() - self._checked_at > self.ttl_s:
            self._state = await self.captioner.readiness()
            self._checked_at = time.monotonic()
        return self._state

    async def wait(self, timeout_s: float) -> tuple[bool, str | None]:
        deadline = time.monotonic() + timeout_s
        state = await self.check()
        while not state[0] and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            state = await self.check(fresh=True)
        return state


def create_app(settings: GatewaySettings | None = None, status_source: StatusSource | None = None) -> FastAPI:
    """Build the gateway app; `status_source` lets a supervisor report start-up errors."""
    settings = settings or GatewaySettings.from_env()
    limits = Limits(max_rows=settings.max_rows)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        captioner = TritonCaptioner(settings.triton_url, settings.model, settings.request_timeout_s,
                                    settings.health_timeout_s)
        app.state.captioner = captioner
        app.state.readiness = Readiness(captioner, status_source)
        try:
            yield
        finally:
            await captioner.close()

    app = FastAPI(title="embcap gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings

    async def health(request: Request) -> JSONResponse:
        ready, problem = await request.app.state.readiness.check(fresh=True)
        body = {
            "status": "healthy" if ready else "initializing",
            "initialization_status": {"model_loaded": ready, "error": problem},
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    async def infer(request: Request) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        started = time.perf_counter()
        try:
            _check_content_type(request)
            embeddings = parse_embeddings(await _read_body(request, settings.max_body_bytes), limits)
            ready, problem = await request.app.state.readiness.wait(settings.startup_wait_s)
            if not ready:
                raise RequestError(503, "initializing", f"model is not ready: {problem}")
            texts = await caption_embeddings(embeddings, request.app.state.captioner, request_id)
        except RequestError as exc:
            log.warning("request %s failed: %s %s: %s", request_id, exc.status, exc.code, exc.message)
            return _error(exc.status, exc.code, exc.message, request_id)
        log.info("request %s: %d captions in %.1f ms", request_id, len(texts), 1000 * (time.perf_counter() - started))
        return Response(encode_texts(texts), media_type="application/json", headers={"X-Request-ID": request_id})

    for path in ("/api/v1/health", "/health", "/"):
        app.add_api_route(path, health, methods=["GET"], include_in_schema=path == "/api/v1/health")
    for path in ("/api/v1/inference", "/api/v1/v2t"):
        app.add_api_route(path, infer, methods=["POST"])
    return app
