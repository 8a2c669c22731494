"""The engines phase: the same checkpoint served by each decoding engine, under the same loads.

For each engine (the hf reference first), server.py is started with `--engine` and one candidate
per row (the engines are compared on their decoding alone; best-of-N is the candidates phase), warmed,
and measured on two input pools: standard-normal rows (the default model writes to its
token limit, so all captions have one length) and realistic rows (embcap.inputs: norms
0.5-1, captions end at their own lengths), closed loop at each concurrency level. Then
an open loop: Poisson arrivals of realistic requests at `open_loop_load` times the hf
engine's best measured request rate. bench/engine_report.py turns this into ratios.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Callable

from bench import loadgen
from bench.common import INPUT_KINDS, embedding_pool

REFERENCE = "hf"  # the engine whose capacity sets the open loop's rate


def run_engines(plan, out: Path, start_stack: Callable, warm: Callable, log: Callable[[str], None],
                results: dict | None = None) -> dict:
    """Measure every engine in `plan.engines`, one candidate per row; `start_stack(plan, folder, export_args)` ->
    (child, grpc, cold s). Each engine's entry is added to `results` (filled in place) as it is measured."""
    pools = {kind: loadgen.encode_bodies(embedding_pool(plan.pool_requests, plan.rows_per_request, plan.seed, kind))
             for kind in INPUT_KINDS}
    engines = sorted(plan.engines, key=lambda name: name != REFERENCE)
    results = {} if results is None else results
    results.update({"engines": {}, "levels": plan.engine_levels, "open_loop_rate_rps": None,
                    "open_loop_load": plan.open_loop_load, "candidates": 1})
    for engine in engines:
        folder = out / f"engine-{engine}"
        (folder / "logs").mkdir(parents=True, exist_ok=True)
        log(f"engine {engine}: starting server.py")
        stack, _, cold = start_stack(plan, folder, [f"--engine={engine}", "--candidates=1"])
        entry: dict = {"cold_start_s": cold}
        results["engines"][engine] = entry
        try:
            warm(stack.base_url, pools["normal"], plan, max(plan.engine_levels))
            for kind, bodies in pools.items():
                log(f"engine {engine}: {kind} inputs at concurrency {plan.engine_levels}")
                levels = loadgen.sweep(stack.base_url, bodies, plan.rows_per_request, plan.engine_levels,
                                       plan.requests_for, plan.level_duration_s, plan.timeout_s)
                entry[kind] = [level.to_dict() for level in levels]
            if results["open_loop_rate_rps"] is None:
                capacity = max(level["requests_per_s"] for level in entry["realistic"])
                results["open_loop_rate_rps"] = plan.open_loop_load * capacity
                results["open_loop_capacity_engine"] = engine
            rate = results["open_loop_rate_rps"]
            log(f"engine {engine}: open loop, {plan.open_loop_requests} realistic requests at {rate:.2f}/s (Poisson)")
            entry["open_loop"] = asyncio.run(loadgen.run_open_loop(
                stack.base_url, pools["realistic"], plan.rows_per_request, rate, plan.open_loop_requests,
                plan.timeout_s, plan.seed)).to_dict()
        finally:
            entry["exit_code"] = stack.stop()
    return results
