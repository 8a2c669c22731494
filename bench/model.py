"""The checkpoint loaded in-process (baseline server and offline loop), as the Triton
decoder loads it: same CaptionGenerator and engines, same thread count, same seed."""

from __future__ import annotations

import json
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

    from embcap.checkpoint import load_checkpoint
    from embcap.decoder_source import resolve_decoder
    from embcap.engines import create_engine
    from embcap.generation import CaptionGenerator
    from embcap.projector import load_projector

    torch.set_num_threads(threads)
    checkpoint = load_checkpoint(checkpoint_dir)
    spec = checkpoint.spec
    torch.manual_seed(spec.generation.seed)
    decoder_dir = resolve_decoder(checkpoint, log=lambda _: None)
    hidden = int(json.loads((decoder_dir / "config.json").read_text())["hidden_size"])
    projector = load_projector(checkpoint.projector_path, spec.embedding_dim, hidden, spec.prefix_length)
    generator = CaptionGenerator.load(spec, decoder_dir, device="cpu", dtype=torch.float32)
    return LocalModel(projector, generator, create_engine(engine, generator, slots), spec.name,
                      spec.generation.model_dump(mode="json"))
