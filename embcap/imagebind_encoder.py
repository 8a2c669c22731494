"""Captions -> vectors exactly as the evaluator's scorer embeds them with its ImageBind text tower.

Each caption is cut into the scorer's pieces (embcap.clip_bpe: at most 74 tokens by its count), each
piece tokenized to 77 ids and embedded by the tower (embcap.imagebind_tower), the piece vectors
normalised and averaged, and the mean normalised again: the cosine of two such vectors is the cosine
the scorer computes. Pieces are embedded in batches of similar length, so short captions do not pay
for 77 positions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from embcap.clip_bpe import ClipBpe
from embcap.imagebind_tower import TowerError, load_tower
from embcap.text_pieces import embed_in_pieces
from embcap.tower_folder import BPE_FILE

PIECES_PER_BATCH = 64  # pieces the tower runs at once (bounds the activation memory of a large request)


class ImageBindTextEncoder:
    """An imported ImageBind text tower behind the TextEncoder protocol (embcap.candidate_encoders)."""

    def __init__(self, folder: str | Path, dim: int | None = None, device: str | torch.device = "cpu",
                 pieces_per_batch: int = PIECES_PER_BATCH) -> None:
        folder = Path(folder)
        self.tower = load_tower(folder, device)
        config = self.tower.config
        if dim is not None and config.output_dim != dim:
            raise TowerError(f"text tower {folder} gives {config.output_dim}-d vectors but the inputs are {dim}-d: "
                             "a tower reranks only in the space of the embeddings it is compared with")
        self.bpe = ClipBpe(folder / BPE_FILE)
        if self.bpe.vocab_size != config.vocab_size:
            raise TowerError(f"{folder / BPE_FILE} holds {self.bpe.vocab_size} tokens but the tower embeds "
                             f"{config.vocab_size}")
        self.dim = config.output_dim
        self.device = torch.device(device)
        self.pieces_per_batch = pieces_per_batch

    def pieces(self, text: str) -> list[str]:
        """The pieces the evaluator embeds `text` in."""
        return self.bpe.evaluator_pieces(text, self.tower.config.chunk_tokens)

    def embed_pieces(self, pieces: list[str]) -> np.ndarray:
        """[len(pieces), dim] unit vectors, each piece embedded whole (77 ids, as the scorer tokenizes it)."""
        ids = self.bpe.batch(pieces, self.tower.config.context_length)
        order = np.argsort(ids.argmax(axis=1), kind="stable")  # similar pooled positions share a batch
        vectors = np.empty((len(pieces), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), self.pieces_per_batch):
                rows = order[start:start + self.pieces_per_batch]
                batch = torch.from_numpy(ids[rows]).to(self.device)
                out = torch.nn.functional.normalize(self.tower(batch).float(), dim=-1)
                vectors[rows] = out.cpu().numpy()
        return vectors

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[N, dim] unit vectors of `texts`, each the normalised mean of its pieces' vectors."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return embed_in_pieces(texts, self.pieces, self.embed_pieces)
