"""An HTTP client that behaves like the competition's evaluator.

* Readiness: ``o1`` polls ``GET /api/v1/health`` every 2 s (5 s timeout each) until
  HTTP 200 with JSON ``status == "healthy"``, 180 s overall; ``v2`` accepts any 200
  from ``/api/v1/health``, ``/health`` or ``/``, 300 s overall.
* Requests: ``POST {"embedding": [batch * D floats]}`` to ``/api/v1/inference`` (o1)
  or ``/api/v1/v2t`` (later), one request at a time, 60 s timeout; the answer must
  be ``{"texts": [...]}`` with exactly one caption per row, otherwise the whole
  batch is lost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import httpx
import numpy as np

ENDPOINTS = {"inference": "/api/v1/inference", "v2t": "/api/v1/v2t"}
HEALTH = {
    "o1": {"paths": ["/api/v1/health"], "interval_s": 2.0, "timeout_s": 5.0, "overall_s": 180.0, "strict": True},
    "v2": {"paths": ["/api/v1/health", "/health", "/"], "interval_s": 2.0, "timeout_s": 5.0, "overall_s": 300.0,
           "strict": False},
}
LOSS_REASONS = ("count_mismatch", "empty", "http_error", "timeout", "connection_error", "bad_response")


NO_SERVER_S = 10.0  # nothing accepts connections for this long: no server is starting there, give up


class NotReady(RuntimeError):
    """The endpoint never reported healthy within the evaluator's deadline (or nothing listens there)."""


def _healthy(response: httpx.Response, strict: bool) -> bool:
    if response.status_code != 200:
        return False
    if not strict:
        return True
    try:
        return response.json().get("status") == "healthy"
    except (ValueError, AttributeError):
        return False


def wait_ready(base_url: str, mode: str = "o1", overall_s: float | None = None, log=print) -> float:
    """Poll health like the evaluator `mode` ("o1", "v2" or "none"); return seconds waited."""
    if mode == "none":
        return 0.0
    rules = HEALTH[mode]
    deadline_s = overall_s if overall_s is not None else rules["overall_s"]
    started = time.monotonic()
    last: object = None
    refused_since: float | None = None  # a starting server answers 503 at once; refused means nobody is there
    with httpx.Client(base_url=base_url, timeout=rules["timeout_s"]) as client:
        while time.monotonic() - started < deadline_s:
            for path in rules["paths"]:
                try:
                    response = client.get(path)
                    refused_since = None
                    if _healthy(response, rules["strict"]):
                        return time.monotonic() - started
                    last = f"{path}: HTTP {response.status_code}"
                except httpx.ConnectError:
                    last = f"{path}: connection refused"
                    if refused_since is None:
                        refused_since = time.monotonic()
                        log(f"nothing answers at {base_url} (connection refused); waiting up to {NO_SERVER_S:.0f} s "
                            "for a server to appear")
                    elif time.monotonic() - refused_since > NO_SERVER_S:
                        raise NotReady(f"no server at {base_url}: nothing accepted a connection for "
                                       f"{NO_SERVER_S:.0f} s; start one (`make serve`) or point --url at it") from None
                except httpx.HTTPError as exc:
                    last = f"{path}: {type(exc).__name__}"
            time.sleep(rules["interval_s"])
    raise NotReady(f"{base_url} not healthy ({mode} rules) within {deadline_s:.0f} s; last: {last}")


@dataclass
class BatchResult:
    """One request: the rows it covered, its captions (None if lost) and why it was lost."""

    rows: list[int]
    texts: list[str] | None
    latency_s: float
    loss_reason: str | None = None
    detail: str = ""


@dataclass
class RunResult:
    """All batches of one evaluation."""

    batches: list[BatchResult] = field(default_factory=list)

    def captions(self, n_rows: int) -> list[str | None]:
        """Per row: the caption, or None where its batch was lost."""
        out: list[str | None] = [None] * n_rows
        for batch in self.batches:
            if batch.texts is not None:
                for row, text in zip(batch.rows, batch.texts):
                    out[row] = text
        return out


def post_batch(client: httpx.Client, path: str, embeddings: np.ndarray, rows: list[int]) -> BatchResult:
    """Send one flattened batch and classify the outcome like the evaluator does."""
    payload = {"embedding": np.asarray(embeddings, dtype=np.float32).reshape(-1).tolist()}
    started = time.monotonic()
    try:
        response = client.post(path, json=payload)
    except httpx.TimeoutException as exc:
        return BatchResult(rows, None, time.monotonic() - started, "timeout", type(exc).__name__)
    except httpx.HTTPError as exc:
        return BatchResult(rows, None, time.monotonic() - started, "connection_error", str(exc)[:200])
    latency = time.monotonic() - started
    if response.status_code != 200:
        return BatchResult(rows, None, latency, "http_error", f"HTTP {response.status_code}: {response.text[:200]}")
    try:
        texts = response.json()["texts"]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts is not a list of strings")
    except (ValueError, KeyError, TypeError) as exc:
        return BatchResult(rows, None, latency, "bad_response", f"{type(exc).__name__}: {exc}"[:200])
    if not texts:
        return BatchResult(rows, None, latency, "empty", "empty texts list")
    if len(texts) != len(rows):
        return BatchResult(rows, None, latency, "count_mismatch", f"{len(texts)} captions for {len(rows)} rows")
    return BatchResult(rows, texts, latency)


def run_requests(
    base_url: str,
    embeddings: np.ndarray,
    batch_size: int = 4,
    endpoint: str = "inference",
    timeout_s: float = 60.0,
    progress: bool = True,
) -> RunResult:
    """Send all rows in sequential requests of `batch_size` rows."""
    from tqdm import tqdm

    path = ENDPOINTS.get(endpoint, endpoint)
    result = RunResult()
    starts = range(0, len(embeddings), batch_size)
    with httpx.Client(base_url=base_url, timeout=timeout_s) as client:
        bar = tqdm(starts, desc=f"POST {path}", unit="req", disable=not progress, dynamic_ncols=True)
        for start in bar:
            rows = list(range(start, min(start + batch_size, len(embeddings))))
            result.batches.append(post_batch(client, path, embeddings[rows], rows))
            lost = sum(b.loss_reason is not None for b in result.batches)
            bar.set_postfix(lost=lost)
    return result
