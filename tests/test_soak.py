"""Soak: sustained concurrency-32 load on server.py (`make soak`; minutes, not hours).

SOAK_SECONDS (default 180) and SOAK_CHECKPOINT (default models/default) set the run.
The report goes to reports/soak.json and reports/soak.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from conftest import ROOT, start_server, stop_process

CONCURRENCY = 32
ROWS = 4
WARM_UP_FRACTION = 0.3
ALLOWED_GROWTH_MB = 25.0  # per process, after warm-up


def process_tree(pid: int) -> dict[int, str]:
    root = psutil.Process(pid)
    names = {pid: "server.py (gateway)"}
    for child in root.children(recursive=True):
        try:
            if child.name() == "triton_python_backend_stub":
                names[child.pid] = f"stub:{Path(child.cmdline()[1]).parent.parent.name}"
            else:
                names[child.pid] = child.name()
        except psutil.Error:
            continue
    return names


class RssSampler(threading.Thread):
    """Samples the resident memory of each process of the tree once a second."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.names = process_tree(pid)
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            row = {}
            for pid, name in self.names.items():
                try:
                    row[name] = psutil.Process(pid).memory_info().rss / 2**20
                except psutil.Error:
                    row[name] = float("nan")
            self.samples.append((time.monotonic(), row))


async def load(base: str, seconds: float) -> list[tuple[int, int, float]]:
    """(status, captions, seconds) of every request sent by CONCURRENCY workers."""
    results: list[tuple[int, int, float]] = []
    deadline = time.monotonic() + seconds

    async def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        async with httpx.AsyncClient(timeout=70) as client:
            while time.monotonic() < deadline:
                body = {"embedding": rng.standard_normal(ROWS * 1024).astype(np.float32).tolist()}
                started = time.monotonic()
                try:
                    response = await client.post(base + "/api/v1/v2t", json=body)
                    count = len(response.json().get("texts", [])) if response.status_code == 200 else 0
                    results.append((response.status_code, count, time.monotonic() - started))
                except httpx.HTTPError:
                    results.append((-1, 0, time.monotonic() - started))

    await asyncio.gather(*(worker(i) for i in range(CONCURRENCY)))
    return results


@pytest.mark.slow
def test_soak(tmp_path):
    seconds = float(os.environ.get("SOAK_SECONDS", "180"))
    checkpoint = Path(os.environ.get("SOAK_CHECKPOINT", ROOT / "models" / "default"))
    process, base = start_server(checkpoint, tmp_path)
    sampler = RssSampler(process.pid)
    sampler.start()
    try:
        started = time.monotonic()
        results = asyncio.run(load(base, seconds))
        elapsed = time.monotonic() - started
    finally:
        sampler.stop.set()
        sampler.join()
        stop_process(process)

    warm = sampler.samples[int(len(sampler.samples) * WARM_UP_FRACTION)][1]
    last = sampler.samples[-1][1]
    growth = {name: round(last[name] - warm[name], 1) for name in warm}
    latencies = sorted(duration for status, _, duration in results if status == 200)
    errors = sum(1 for status, _, _ in results if status != 200)
    wrong_counts = sum(1 for status, count, _ in results if status == 200 and count != ROWS)
    report = {
        "checkpoint": str(checkpoint), "seconds": round(elapsed, 1), "concurrency": CONCURRENCY,
        "requests": len(results), "errors": errors, "wrong_counts": wrong_counts,
        "captions_per_s": round(ROWS * len(latencies) / elapsed, 2),
        "p50_s": round(latencies[len(latencies) // 2], 3) if latencies else None,
        "p95_s": round(latencies[int(len(latencies) * 0.95)], 3) if latencies else None,
        "rss_after_warm_up_mb": {k: round(v, 1) for k, v in warm.items()},
        "rss_end_mb": {k: round(v, 1) for k, v in last.items()},
        "rss_growth_mb": growth,
    }
    out = ROOT / "reports"
    out.mkdir(exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    table = ["| process | RSS after warm-up (MB) | RSS at end (MB) | growth (MB) |", "|---|---|---|---|"]
    table += [f"| {k} | {warm[k]:.1f} | {last[k]:.1f} | {growth[k]:+.1f} |" for k in warm]
    summary = (f"{report['requests']} requests in {report['seconds']} s at concurrency {CONCURRENCY}, "
               f"{errors} errors, {wrong_counts} wrong counts, {report['captions_per_s']} captions/s, "
               f"p50 {report['p50_s']} s, p95 {report['p95_s']} s")
    (out / "soak.md").write_text(f"# Soak\n\n{summary}\n\n" + "\n".join(table) + "\n")
    print("\n" + summary + "\n" + "\n".join(table))

    assert report["requests"] > CONCURRENCY
    assert errors == 0 and wrong_counts == 0
    assert all(g <= ALLOWED_GROWTH_MB for g in growth.values()), growth
