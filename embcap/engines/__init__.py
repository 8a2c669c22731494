"""Decoding engines behind the Triton decoder model; the export's `--engine` picks one.

- `continuous` (default): iteration-level batching over a slot KV cache, CUDA graphs on a GPU.
- `hf`: Hugging Face `generate()` per dynamic batch, kept as the reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from embcap.contract import DEFAULT_ENGINE, ENGINES, QUEUE_DELAY_US
from embcap.engines.base import Cancelled, Engine, EngineFailed, EngineStats, Job, Overloaded, generate_blocking

if TYPE_CHECKING:
    from embcap.generation import CaptionGenerator


def create_engine(name: str, generator: "CaptionGenerator", slots: int, use_graphs: bool | None = None,
                  candidates: int = 1, **continuous) -> Engine:
    """The engine called `name` over a loaded generator; `slots` bounds the rows decoding at once, and
    each row gets `candidates` captions (best-of-N candidates for a reranker; embcap.candidates).
    `continuous` are the continuous engine's own settings (timeout_s, max_queued_rows, on_failure,
    attention_backend, on_profile); the hf engine has none."""
    if name == "hf":
        from embcap.engines.hf import HFEngine

        return HFEngine(generator, candidates)
    if name == "continuous":
        from embcap.engines.continuous.engine import ContinuousEngine

        return ContinuousEngine(generator, slots, use_graphs, candidates=candidates, **continuous)
    raise ValueError(f"unknown engine {name!r}: choose one of {ENGINES}")


__all__ = ["Cancelled", "DEFAULT_ENGINE", "ENGINES", "Engine", "EngineFailed", "EngineStats", "Job", "Overloaded",
           "QUEUE_DELAY_US", "create_engine", "generate_blocking"]
