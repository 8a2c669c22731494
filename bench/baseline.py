"""The naive baseline: how the reference miner serves.

A FastAPI app that runs the same checkpoint in-process with PyTorch (the projector)
and Hugging Face `generate()` (embcap.generation.CaptionGenerator, the very code
the Triton decoder runs, so weights and generation settings are identical). Each
request's rows are decoded as one batch, one request at a time: no cross-request
batching. Same endpoints and port convention as the gateway.

    python -m bench.baseline --checkpoint models/default --port 8100
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from gateway.app import HEALTH_PATHS, INFERENCE_PATHS
from gateway.protocol import Limits, RequestError, encode_texts, parse_embeddings


def load_captioner(checkpoint: Path, threads: int, engine: str = "hf"):
    """(embeddings -> captions, row width): the checkpoint on the CPU as the Triton decoder loads it (same
    CaptionGenerator and engines, `threads` torch threads, the spec's seed)."""
    import torch

    from embcap.engines import create_engine, generate_blocking
    from embcap.loading import resolve_checkpoint

    torch.set_num_threads(threads)
    resolved = resolve_checkpoint(checkpoint)
    torch.manual_seed(resolved.spec.generation.seed)
    projector, decoder = resolved.load_projector(), create_engine(engine, resolved.load_generator(), 64)

    def caption(embeddings: np.ndarray) -> list[str]:
        with torch.inference_mode():
            prefix = projector(torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)))
        return generate_blocking(decoder, np.asarray(prefix, dtype=np.float32))

    return caption, resolved.spec.embedding_dim


def create_app(checkpoint: Path, threads: int) -> FastAPI:
    caption, embedding_dim = load_captioner(checkpoint, threads)
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")  # one request at a time
    limits = Limits(embedding_dim=embedding_dim)
    app = FastAPI(title="embcap naive baseline", docs_url=None, redoc_url=None)

    async def health() -> JSONResponse:
        return JSONResponse({"status": "healthy", "initialization_status": {"model_loaded": True, "error": None}})

    async def infer(request: Request) -> Response:
        try:
            embeddings = parse_embeddings(await request.body(), limits)
        except RequestError as exc:
            return JSONResponse({"error": exc.code, "detail": exc.message}, status_code=exc.status)
        texts = await asyncio.get_running_loop().run_in_executor(worker, caption, embeddings)
        return Response(encode_texts(texts), media_type="application/json")

    for path in HEALTH_PATHS:
        app.add_api_route(path, health, methods=["GET"])
    for path in INFERENCE_PATHS:
        app.add_api_route(path, infer, methods=["POST"])
    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from export.options import ExportOptions

    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench.baseline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=ExportOptions().decoder_threads,
                        help="torch threads (default: the Triton decoder's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    app = create_app(args.checkpoint, args.threads)
    logging.getLogger("bench.baseline").info("model loaded in %.1f s", time.perf_counter() - started)
    uvicorn.run(app, host=args.bind, port=args.port, access_log=False, log_level="info")


if __name__ == "__main__":
    main()
