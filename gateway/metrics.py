"""Prometheus metrics of the gateway; Triton's own metrics are appended when it exposes them."""

from __future__ import annotations

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

IN_FLIGHT = "embcap_in_flight_requests"  # the gauge of requests being served (the autoscaler scales on it)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class GatewayMetrics:
    """One registry per app, so several apps in one process do not collide."""

    def __init__(self, triton_metrics_url: str | None = None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("embcap_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("embcap_request_seconds", "Request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.rows = Histogram("embcap_rows_per_request", "Embeddings per valid request",
                              buckets=ROW_BUCKETS, registry=self.registry)
        self.triton_errors = Counter("embcap_triton_errors", "Failed Triton calls by error code",
                                     ["code"], registry=self.registry)
        self.in_flight = Gauge(IN_FLIGHT, "Inference requests being served",
                               registry=self.registry)
        self.model_device = Gauge("embcap_model_device", "1 for the device each model runs on (cpu or cuda)",
                                  ["model", "device"], registry=self.registry)
        self.triton_metrics_url = triton_metrics_url
        self._client: httpx.AsyncClient | None = None  # one keep-alive connection to Triton's metrics, reused

    def set_model_devices(self, devices: dict[str, str]) -> None:
        """Replace the model -> device rows."""
        self.model_device.clear()
        for model, device in devices.items():
            self.model_device.labels(model, device).set(1)

    async def render(self) -> bytes:
        """Gateway metrics, followed by Triton's if its metrics endpoint answers."""
        text = generate_latest(self.registry)
        if self.triton_metrics_url:
            if self._client is None:
                self._client = httpx.AsyncClient(timeout=1.0, limits=httpx.Limits(max_connections=1))
            try:
                response = await self._client.get(self.triton_metrics_url)
                if response.status_code == 200:
                    text += b"\n# Triton Inference Server metrics\n" + response.content
            except httpx.HTTPError:
                text += b"\n# Triton metrics unavailable\n"
        return text

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
