"""Loading a checkpoint for use: its spec, its decoder folder and config, its projector, its generator.

Export, evaluation, training's scoring and the benchmarks go through `resolve_checkpoint`; the
Triton decoder, whose decoder folder the export already resolved, builds a `ResolvedCheckpoint`
from it directly. Either way one class loads a checkpoint's parts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from embcap.checkpoint import CaptionModelSpec, Checkpoint, load_checkpoint
from embcap.decoder_source import resolve_decoder

if TYPE_CHECKING:
    import torch

    from embcap.generation import CaptionGenerator
    from embcap.projector import Projector


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """A checkpoint whose decoder is on disk as a Hugging Face folder."""

    checkpoint: Checkpoint
    decoder_dir: Path

    @property
    def spec(self) -> CaptionModelSpec:
        return self.checkpoint.spec

    @cached_property
    def decoder_config(self) -> dict:
        """The decoder's `config.json`."""
        return json.loads((self.decoder_dir / "config.json").read_text())

    @property
    def hidden_size(self) -> int:
        return int(self.decoder_config["hidden_size"])

    @property
    def model_type(self) -> str | None:
        return self.decoder_config.get("model_type")

    def load_projector(self) -> "Projector":
        """The projector with the spec's input normalisation, its shapes checked against the spec and the decoder."""
        from embcap.projector import load_projector

        return load_projector(self.checkpoint.projector_path, self.spec.embedding_dim, self.hidden_size,
                              self.spec.prefix_length, self.spec.input_norm)

    def load_generator(self, device: str = "cpu", dtype: "torch.dtype | None" = None, lean: bool = False,
                       log: Callable[[str], None] = lambda _: None) -> "CaptionGenerator":
        """The decoder and tokenizer on `device` (float32 unless `dtype` says otherwise); `lean`: only the
        continuous engine's weights (embcap.lean_llama), read straight onto the device."""
        import torch

        from embcap.generation import CaptionGenerator

        return CaptionGenerator.load(self.spec, self.decoder_dir, device=device, dtype=dtype or torch.float32,
                                     lean=lean, log=log)


def resolve_checkpoint(root: str | Path, log: Callable[[str], None] = lambda _: None) -> ResolvedCheckpoint:
    """Load `root`'s spec and put its decoder on disk (de-quantised once into the cache if it is GGUF)."""
    checkpoint = load_checkpoint(root)
    return ResolvedCheckpoint(checkpoint, resolve_decoder(checkpoint, log=log))
