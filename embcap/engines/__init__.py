"""Decoding engines behind the Triton decoder model; the export's `--engine` picks one.

- `continuous` (default): iteration-level batching over a slot KV cache, CUDA graphs on a GPU.
- `hf`: Hugging Face `generate()` per dynamic batch, kept as the reference.
"""

from __future__ import annotations

from embcap.engines.base import Cancelled, Engine, EngineStats, Job, generate_blocking
from embcap.generation import CaptionGenerator

ENGINES = ("continuous", "hf")
DEFAULT_ENGINE = "continuous"
# Triton's dynamic-batching queue delay in front of each engine: the hf engine needs
# requests to meet in one batch (bench/RESULTS.md: 20 ms at c=16); the continuous one
# batches by itself and must not wait.
QUEUE_DELAY_US = {"continuous": 0, "hf": 20_000}


def create_engine(name: str, generator: CaptionGenerator, slots: int, use_graphs: bool | None = None,
                  candidates: int = 1) -> Engine:
    """The engine called `name` over a loaded generator; `slots` bounds the rows decoding at once, and
    each row gets `candidates` captions (best-of-N candidates for a reranker; embcap.candidates)."""
    if name == "hf":
        from embcap.engines.hf import HFEngine

        return HFEngine(generator, candidates)
    if name == "continuous":
        from embcap.engines.continuous import ContinuousEngine

        return ContinuousEngine(generator, slots, use_graphs, candidates=candidates)
    raise ValueError(f"unknown engine {name!r}: choose one of {ENGINES}")


__all__ = ["Cancelled", "DEFAULT_ENGINE", "ENGINES", "Engine", "EngineStats", "Job", "QUEUE_DELAY_US",
           "create_engine", "generate_blocking"]
