"""Gateway overhead paired per request: client time minus Triton's own time for that request.

At concurrency 1, requests alternate between the gateway (HTTP + JSON) and a direct gRPC
call to the same Triton model with the same embeddings. Triton's statistics are read
before and after each request, so each sample is that request's time outside Triton: the
decoder's run-to-run jitter, which dominates an unpaired p50 difference, cancels per
request. The overhead is mean(gateway path) - mean(direct path), with a Welch 95% interval
(tooling.stats.welch_difference): the benchmark's one gateway-overhead figure. The HTTP side uses
the standard library's keep-alive client, lean like tritonclient's gRPC on the direct side, so the
figure is the gateway's cost, not an HTTP client library's (httpx adds ~0.45 ms per request of its own).

    python -m bench.overhead --gateway-url http://127.0.0.1:8000 --grpc-url 127.0.0.1:8001
"""

from __future__ import annotations

import argparse
import json
import time
from http.client import HTTPConnection
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from embcap.contract import CAPTION, EMBEDDING, EMBEDDING_DIM, ENSEMBLE
from embcap.inputs import realistic_embeddings
from tooling.stats import VERDICT_WORDS, verdict, welch_difference


def _triton_time(client, model: str) -> tuple[int, int]:
    stats = client.get_inference_statistics(model).model_stats[0].inference_stats
    return stats.success.count, stats.success.ns


def _inside_ms(client, model: str, before: tuple[int, int], timeout_s: float = 2.0) -> float:
    """Triton's time for the one request since `before` (its statistics land just after the reply)."""
    deadline = time.monotonic() + timeout_s
    while True:
        count, ns = _triton_time(client, model)
        if count == before[0] + 1:
            return (ns - before[1]) / 1e6
        if count > before[0] + 1 or time.monotonic() > deadline:
            raise RuntimeError(f"Triton counted {count - before[0]} requests for one: another client is active")
        time.sleep(0.002)


def measure(gateway_url: str, grpc_url: str, requests: int, rows: int = 4, seed: int = 0,
            warmup: int = 3, model: str = ENSEMBLE) -> dict:
    """Per-request time outside Triton (ms) on both paths, alternating, after `warmup` of each."""
    import tritonclient.grpc as grpcclient

    pool = realistic_embeddings((requests + warmup) * rows, seed=seed).reshape(-1, rows, EMBEDDING_DIM)
    client = grpcclient.InferenceServerClient(grpc_url)
    address = urlsplit(gateway_url)
    http = HTTPConnection(address.hostname or "127.0.0.1", address.port or 80, timeout=120)
    ours, direct = [], []
    try:
        for index, rows_array in enumerate(pool):
            body = json.dumps({"embedding": rows_array.ravel().tolist()}).encode()
            tensor = grpcclient.InferInput(EMBEDDING, list(rows_array.shape), "FP32")
            tensor.set_data_from_numpy(np.ascontiguousarray(rows_array))
            for path in ((ours, direct) if index % 2 else (direct, ours)):  # alternate which goes first
                before = _triton_time(client, model)
                started = time.perf_counter()
                if path is ours:
                    http.request("POST", "/api/v1/inference", body=body, headers={"Content-Type": "application/json"})
                    response = http.getresponse()
                    payload = response.read()
                    if response.status != 200:
                        raise RuntimeError(f"gateway answered {response.status}: {payload[:200]!r}")
                    assert len(json.loads(payload)["texts"]) == rows
                else:
                    result = client.infer(model, [tensor], outputs=[grpcclient.InferRequestedOutput(CAPTION)])
                    assert len(result.as_numpy(CAPTION).reshape(-1)) == rows
                elapsed_ms = 1000 * (time.perf_counter() - started)
                outside = elapsed_ms - _inside_ms(client, model, before)
                if index >= warmup:
                    path.append(outside)
    finally:
        http.close()
        client.close()
    return {"requests": requests, "rows_per_request": rows, "http_client": "http.client",
            "gateway_outside_ms": ours, "direct_outside_ms": direct}


def summary(samples: dict) -> str:
    """One paragraph: both paths' medians, the paired overhead with its interval, the verdict."""
    ours, direct = samples["gateway_outside_ms"], samples["direct_outside_ms"]
    estimate = welch_difference(ours, direct)
    return (f"time outside Triton per request, {len(ours)} + {len(direct)} requests of "
            f"{samples['rows_per_request']} rows: gateway path median {np.median(ours):.2f} ms, "
            f"direct gRPC median {np.median(direct):.2f} ms; overhead {estimate.text(unit=' ms')}; "
            f"< 2 ms: {VERDICT_WORDS[verdict(estimate, 2.0, higher_is_better=False)]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench.overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway-url", required=True)
    parser.add_argument("--grpc-url", required=True)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--rows-per-request", type=int, default=4)
    parser.add_argument("--out", type=Path, help="write the samples here as JSON")
    args = parser.parse_args(argv)
    samples = measure(args.gateway_url, args.grpc_url, args.requests, args.rows_per_request)
    if args.out:
        args.out.write_text(json.dumps(samples, indent=1) + "\n")
    print(summary(samples))


if __name__ == "__main__":
    main()
