"""The checkpoint loaded in-process (baseline server and offline loop), as the Triton
decoder loads it: same CaptionGenerator and engines, same thread count, same seed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class LocalModel:
    projector: object  # embcap.projector.Projector
    generator: object  # embcap.generation.CaptionGenerator
    engine: object  # an embcap.engines engine over it
    name: str
    settings: dict  # the checkpoint's generation settings, for the report
    embedding_dim: int  # the row width the checkpoint takes

    def prefix(self, embeddings: np.ndarray):
        import torch

        with torch.inference_mode():
            return self.projector(torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)))

    def decode(self, prefix) -> list[str]:
        """Captions of [N, P, H] prefix vectors through the engine."""
        from embcap.engines import generate_blocking

        return generate_blocking(self.engine, np.asarray(prefix, dtype=np.float32))

    def caption(self, embeddings: np.ndarray) -> list[str]:
        return self.decode(self.prefix(embeddings))


def load_local_model(checkpoint_dir: str | Path, threads: int, engine: str = "hf", slots: int = 64) -> LocalModel:
    """The checkpoint on the CPU with `threads` torch threads, decoding through `engine`."""
    import torch

    from embcap.engines import create_engine
    from embcap.loading import resolve_checkpoint

    torch.set_num_threads(threads)
    resolved = resolve_checkpoint(checkpoint_dir)
    spec = resolved.spec
    torch.manual_seed(spec.generation.seed)
    generator = resolved.load_generator()
    return LocalModel(resolved.load_projector(), generator, create_engine(engine, generator, slots), spec.name,
                      spec.generation.model_dump(mode="json"), spec.embedding_dim)
