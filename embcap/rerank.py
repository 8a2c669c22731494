"""Best-of-N selection: the candidate caption whose embedding is closest to the row's input embedding.

A candidate's score is its cosine to the input embedding in the encoder's space, blended
with consensus when `consensus_weight` w > 0: score = (1 - w) * cosine + w * (its mean cosine
to the row's other candidates; MBR-style). The highest score wins; ties go to the lower
index (candidate 0 is the greedy caption), so an input with no direction (all zeros) gets
the greedy caption. Identical candidates are embedded once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from embcap.candidate_encoders import TextEncoder
from embcap.generation import BLANK_FALLBACK, is_visible


def candidate_scores(embedding: np.ndarray, candidates: np.ndarray, consensus_weight: float = 0.0) -> np.ndarray:
    """[N] scores of [N, D] unit candidate vectors for one [D] input embedding (of any norm)."""
    norm = float(np.linalg.norm(embedding))
    cosine = candidates @ (embedding / norm) if norm > 0 else np.zeros(len(candidates), dtype=np.float32)
    if consensus_weight == 0.0 or len(candidates) < 2:
        return cosine.astype(np.float32)
    similarity = candidates @ candidates.T
    consensus = (similarity.sum(axis=1) - np.diag(similarity)) / (len(candidates) - 1)
    return ((1.0 - consensus_weight) * cosine + consensus_weight * consensus).astype(np.float32)


@dataclass
class Choice:
    """The chosen caption of each row, its index among the row's candidates, and the row's scores."""

    texts: list[str]
    indices: list[int]
    scores: list[np.ndarray]


class Reranker:
    """Picks one caption per row from its candidates with a text encoder."""

    def __init__(self, encoder: TextEncoder, consensus_weight: float = 0.0) -> None:
        self.encoder = encoder
        self.consensus_weight = consensus_weight

    def choose(self, embeddings: np.ndarray, candidates: Sequence[Sequence[str]]) -> Choice:
        """One caption per row of [rows, D] `embeddings`, from that row's candidates (never blank)."""
        if len(embeddings) != len(candidates):
            raise ValueError(f"{len(embeddings)} embeddings but {len(candidates)} rows of candidates")
        # Blank candidates cannot come from the engines; should one arrive, it is never chosen.
        rows = [[text if is_visible(text) else "" for text in row] for row in candidates]
        unique = sorted({text for row in rows for text in row if text})
        vectors = dict(zip(unique, self.encoder.encode(unique))) if unique else {}
        texts, indices, all_scores = [], [], []
        for embedding, row in zip(np.asarray(embeddings, dtype=np.float32), rows):
            visible = [index for index, text in enumerate(row) if text]
            scores = np.full(len(row), -np.inf, dtype=np.float32)
            if visible:
                stacked = np.stack([vectors[row[index]] for index in visible])
                scores[visible] = candidate_scores(embedding, stacked, self.consensus_weight)
                best = int(np.argmax(scores))  # the first of equal scores
                texts.append(row[best])
            else:
                best = 0
                texts.append(BLANK_FALLBACK)
            indices.append(best)
            all_scores.append(scores)
        return Choice(texts, indices, all_scores)
