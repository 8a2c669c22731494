"""The offline limit: the decoder's own batched throughput in a plain loop, no server.

Runs in its own process (started by `python -m bench run`) with the same thread
settings as the Triton decoder. Only the decoder is timed (the projector runs
before the clock starts), over rows from the same embedding pool the load
generator sends.

    python -m bench.offline --checkpoint models/default --batches 1,4,16,32 --out offline.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from bench.common import embedding_pool
from embcap.contract import EMBEDDING_DIM
from embcap.engines import DEFAULT_ENGINE, ENGINES


def measure(model, rows: np.ndarray, batch: int, min_seconds: float, min_repeats: int, max_repeats: int) -> dict:
    """Time the engine at `batch` rows, cycling through `rows`, until enough samples."""
    times: list[float] = []
    tokens: list[int] = []
    start_row = 0
    total_started = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - total_started < min_seconds):
        index = [(start_row + i) % len(rows) for i in range(batch)]
        start_row += batch
        prefix = model.prefix(rows[index])
        started = time.perf_counter()
        texts = model.decode(prefix)
        times.append(time.perf_counter() - started)
        tokenizer = model.generator.tokenizer
        tokens.extend(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    total = sum(times)
    return {
        "batch": batch,
        "repeats": len(times),
        "seconds_per_batch_mean": total / len(times),
        "seconds_per_batch_median": statistics.median(times),
        "captions_per_s": batch * len(times) / total,
        "mean_caption_tokens": float(np.mean(tokens)) if tokens else 0.0,
    }


def run(checkpoint: Path, batches: list[int], threads: int, pool_requests: int, rows_per_request: int, seed: int,
        min_seconds: float, min_repeats: int, max_repeats: int, engine: str = DEFAULT_ENGINE) -> dict:
    from bench.model import load_local_model

    model = load_local_model(checkpoint, threads, engine, slots=max(batches))
    rows = embedding_pool(pool_requests, rows_per_request, seed).reshape(-1, EMBEDDING_DIM)
    model.decode(model.prefix(rows[:min(4, len(rows))]))  # warm-up (allocator, lazy init)
    results = [measure(model, rows, b, min_seconds, min_repeats, max_repeats) for b in batches]
    return {"checkpoint": str(checkpoint), "model": model.name, "threads": threads, "engine": engine,
            "generation": model.settings, "results": results}


def main(argv: list[str] | None = None) -> None:
    from export.options import ExportOptions

    parser = argparse.ArgumentParser(prog="python -m bench.offline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--batches", default="1,4,16,32")
    parser.add_argument("--threads", type=int, default=ExportOptions().decoder_threads)
    parser.add_argument("--pool-requests", type=int, default=64)
    parser.add_argument("--rows-per-request", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-seconds", type=float, default=10.0, help="keep repeating a batch size this long")
    parser.add_argument("--min-repeats", type=int, default=2)
    parser.add_argument("--max-repeats", type=int, default=50)
    parser.add_argument("--engine", choices=ENGINES, default=DEFAULT_ENGINE, help="decoding engine (embcap.engines)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = run(args.checkpoint, [int(b) for b in args.batches.split(",")], args.threads, args.pool_requests,
                 args.rows_per_request, args.seed, args.min_seconds, args.min_repeats, args.max_repeats,
                 args.engine)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
