"""The served model's path in one process: projector -> decoding engine (N candidates) -> reranker.

What Triton's ensemble does across its stages, for tools that caption without a server
(`python -m evaluate --checkpoint`, benchmarks): the same projector, the same engine and
the same reranker code, so a score measured here is the score the stack would get.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from embcap.engines import DEFAULT_ENGINE, create_engine, generate_blocking
from embcap.loading import ResolvedCheckpoint
from embcap.rerank import Choice, Reranker


class CaptionPipeline:
    """Caption [rows, E] embeddings in-process, `candidates` per row reranked as the server does."""

    def __init__(self, resolved: ResolvedCheckpoint, candidates: int | None = None, engine: str = DEFAULT_ENGINE,
                 slots: int = 16, device: str = "cpu") -> None:
        from embcap.candidate_encoders import load_text_encoder

        self.resolved = resolved
        self.candidates = candidates or resolved.spec.rerank.candidates
        self.slots = slots
        self.projector = resolved.load_projector()
        self.generator = resolved.load_generator(device)
        self.engine = create_engine(engine, self.generator, slots, candidates=self.candidates)
        self.reranker = None
        if self.candidates > 1:
            self.reranker = Reranker(load_text_encoder(resolved.checkpoint, device=device),
                                     resolved.spec.rerank.consensus_weight)

    def close(self) -> None:
        self.engine.close()

    def candidate_rows(self, embeddings: np.ndarray) -> list[list[str]]:
        """Every row's `candidates` captions, in candidate order."""
        texts: list[str] = []
        for start in range(0, len(embeddings), self.slots):
            with torch.inference_mode():
                prefix = self.projector(torch.from_numpy(np.ascontiguousarray(embeddings[start:start + self.slots])))
            texts += generate_blocking(self.engine, prefix.numpy())
        count = self.candidates
        return [texts[row * count:(row + 1) * count] for row in range(len(embeddings))]

    def choose(self, embeddings: np.ndarray, candidates: Sequence[Sequence[str]]) -> Choice:
        """The reranker's choice among the given candidates of each row (the first one without a reranker)."""
        if self.reranker is None or all(len(row) == 1 for row in candidates):
            return Choice([row[0] for row in candidates], [0] * len(candidates),
                          [np.zeros(len(row), dtype=np.float32) for row in candidates])
        return self.reranker.choose(embeddings, candidates)

    def caption(self, embeddings: np.ndarray) -> list[str]:
        """One caption per row, as the served model answers."""
        return self.choose(embeddings, self.candidate_rows(embeddings)).texts
