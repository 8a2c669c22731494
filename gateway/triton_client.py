"""One shared asynchronous gRPC client for Triton's ensemble (embcap.contract.ENSEMBLE)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from embcap.contract import CAPTION, DEADLINE_MARK, EMBEDDING, ENSEMBLE, OVERLOAD_MARK
from embcap.deadlines import DEFAULT_REQUEST_TIMEOUT_S
from gateway.protocol import BackendError

# Reconnect quickly after Triton restarts (gRPC's default backoff grows to 120 s).
CHANNEL_ARGS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


def backend_error(exc: InferenceServerException, what: str) -> BackendError:
    """The gateway's answer to a failed Triton call: 503 unreachable or over capacity, 504 too slow, else 502."""
    status = str(exc.status() or "")
    if "UNAVAILABLE" in status and OVERLOAD_MARK in (exc.message() or ""):
        return BackendError(503, "over_capacity", f"the decoder is over capacity ({what}): {exc.message()}")
    if "UNAVAILABLE" in status:
        return BackendError(503, "triton_unavailable", f"Triton is not reachable ({what}): {exc.message()}")
    if "DEADLINE_EXCEEDED" in status or DEADLINE_MARK in (exc.message() or ""):  # our deadline or the engine's
        return BackendError(504, "triton_timeout", f"Triton did not answer in time ({what})")
    return BackendError(502, "triton_error", f"Triton failed ({what}): {exc.message()}")


@dataclass(frozen=True)
class ServedShape:
    """What the served model takes, from its config: the row width and the rows per call."""

    embedding_dim: int
    max_batch_size: int


class TritonCaptioner:
    """Calls the ensemble; splits batches larger than the model's max_batch_size."""

    def __init__(self, url: str, model: str = ENSEMBLE, timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
                 health_timeout_s: float = 1.0, server_id: str = ""):
        """`server_id`: the name Triton must answer in its metadata; another server on the port is not ready."""
        self.url = url
        self.server_id = server_id
        self.model = model
        self.timeout_s = timeout_s
        self.health_timeout_s = health_timeout_s
        self.client = grpcclient.InferenceServerClient(url, channel_args=CHANNEL_ARGS)
        self._shape: ServedShape | None = None

    async def close(self) -> None:
        await self.client.close()

    async def readiness(self) -> tuple[bool, str | None]:
        """(ready, reason): the server AND the captioner model must both be ready."""
        try:
            if self.server_id:
                name = (await self.client.get_server_metadata(client_timeout=self.health_timeout_s)).name
                if name != self.server_id:
                    return False, (f"the Triton at {self.url} is another server (id {name[:64]!r}, expected "
                                   f"{self.server_id!r}): another server is using this gRPC port")
            if not await self.client.is_server_ready(client_timeout=self.health_timeout_s):
                return False, "Triton server is not ready"
            if not await self.client.is_model_ready(self.model, client_timeout=self.health_timeout_s):
                return False, f"model '{self.model}' is not ready"
        except InferenceServerException as exc:
            return False, backend_error(exc, "health").message
        return True, None

    @property
    def known_shape(self) -> ServedShape | None:
        """The served shape if it was read already (no call to Triton)."""
        return self._shape

    async def served_shape(self) -> ServedShape:
        """The model's row width and max_batch_size, read once from Triton."""
        if self._shape is None:
            try:
                config = (await self.client.get_model_config(self.model,
                                                             client_timeout=self.health_timeout_s * 5)).config
            except InferenceServerException as exc:
                raise backend_error(exc, "model config") from None
            inputs = {tensor.name: list(tensor.dims) for tensor in config.input}
            if EMBEDDING not in inputs:
                raise BackendError(502, "contract_mismatch",
                                   f"model '{self.model}' has no input {EMBEDDING} (inputs: {sorted(inputs)})")
            self._shape = ServedShape(int(inputs[EMBEDDING][-1]), max(1, int(config.max_batch_size)))
        return self._shape

    async def _infer(self, rows: np.ndarray, request_id: str) -> list[str]:
        tensor = grpcclient.InferInput(EMBEDDING, list(rows.shape), "FP32")
        tensor.set_data_from_numpy(rows)
        try:
            result = await self.client.infer(
                self.model, [tensor], outputs=[grpcclient.InferRequestedOutput(CAPTION)],
                request_id=request_id, client_timeout=self.timeout_s,
            )
        except InferenceServerException as exc:
            raise backend_error(exc, "inference") from None
        captions = result.as_numpy(CAPTION)
        return [] if captions is None else [c.decode("utf-8", "replace") for c in captions.reshape(-1)]

    async def caption(self, embeddings: np.ndarray, request_id: str = "") -> list[str]:
        """One caption per row of `embeddings` ([rows, dim] float32), in order."""
        limit = (await self.served_shape()).max_batch_size
        chunks = [embeddings[i:i + limit] for i in range(0, len(embeddings), limit)]
        if len(chunks) == 1:
            return await self._infer(chunks[0], request_id)
        parts = await asyncio.gather(
            *(self._infer(chunk, f"{request_id}.{i}" if request_id else "") for i, chunk in enumerate(chunks))
        )
        return [text for part in parts for text in part]
