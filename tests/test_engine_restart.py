"""A decoder engine that fails for good (as after a sticky CUDA error) ends in a restarted Triton, not a hang.

The failure is injected at the decoder model's seam (EMBCAP_FAULT_AFTER_STEPS: every decode step after
that many raises, as every step does after a sticky CUDA error, which a CPU cannot produce); the rest is
the real server.py, tritonserver and gateway.
"""

from __future__ import annotations

import time

import httpx

from conftest import start_server, stop_process
from embcap.inputs import realistic_embeddings


def test_a_failed_engine_restarts_triton_with_the_reason_in_health(tiny_checkpoint, tmp_path):
    process, base = start_server(tiny_checkpoint, tmp_path, ready_timeout_s=180,
                                 env={"EMBCAP_FAULT_AFTER_STEPS": "16"})
    try:
        body = {"embedding": realistic_embeddings(2, seed=1).reshape(-1).tolist()}
        statuses, reasons, started = [], [], time.monotonic()
        while time.monotonic() - started < 60 and not reasons:
            statuses.append(httpx.post(base + "/api/v1/inference", json=body, timeout=60).status_code)
            health = httpx.get(base + "/api/v1/health", timeout=10)
            if health.status_code == 503:
                reasons.append(health.json()["initialization_status"]["error"])
        assert statuses[0] == 200 and any(status != 200 for status in statuses), statuses
        assert time.monotonic() - started < 60, "every request should be answered, none held for a deadline"
        assert reasons and "the engine of model 'decoder' failed" in reasons[0], reasons
        assert "illegal memory access" in reasons[0] and "restarting tritonserver" in reasons[0]
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and httpx.get(base + "/api/v1/health", timeout=10).status_code != 200:
            time.sleep(0.5)
        assert httpx.get(base + "/api/v1/health", timeout=10).json()["status"] == "healthy"
        answer = httpx.post(base + "/api/v1/inference", json=body, timeout=60)
        assert answer.status_code == 200 and len(answer.json()["texts"]) == 2
    finally:
        stop_process(process)
