"""Request embeddings shaped like the evaluator's: the one generator of test inputs.

The evaluator sends ImageBind video embeddings, each the mean of
``CLIPS_PER_EMBEDDING`` unit-norm clip embeddings, so a row's norm is at most 1
and usually 0.5-0.9 (clips of one video point in similar directions), never
exactly 1. Tests, the local evaluator and the benchmarks draw their inputs here
so that none of them silently assumes unit norm.
"""

from __future__ import annotations

import numpy as np

from embcap.contract import EMBEDDING_DIM

CLIPS_PER_EMBEDDING = 15
# Cosine between a clip and its video's direction, drawn per row; with 15 clips
# this gives row norms of about 0.43 (0.35) to 0.95 (0.95), mostly 0.5-0.9.
CLIP_COSINE_RANGE = (0.35, 0.95)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def realistic_embeddings(rows: int, dim: int = EMBEDDING_DIM, seed: int = 0) -> np.ndarray:
    """Return float32 ``[rows, dim]`` embeddings, each the mean of 15 random unit vectors.

    Each row has its own random direction ``u`` and spread: its 15 clips are unit
    vectors ``normalise(c * u + sqrt(1 - c^2) * w_i)`` with random ``w_i`` and a
    per-row cosine ``c`` drawn from `CLIP_COSINE_RANGE`, so norms are at most 1
    and mostly 0.5-0.9, as the evaluator's are. Deterministic in `seed`.
    """
    if rows < 0 or dim < 2:
        raise ValueError(f"need rows >= 0 and dim >= 2, got rows={rows}, dim={dim}")
    rng = np.random.default_rng(seed)
    return _clip_means(_unit_rows(rng.standard_normal((rows, dim))), rng)


def realistic_around(directions: np.ndarray, seed: int = 0) -> np.ndarray:
    """Float32 embeddings shaped like the evaluator's around given ``[rows, dim]`` directions:
    each row becomes the mean of 15 unit "clips" spread around it (norm mostly 0.5-0.9)."""
    directions = np.asarray(directions, dtype=np.float64)
    return _clip_means(_unit_rows(directions), np.random.default_rng(seed))


def _clip_means(direction: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    rows, dim = direction.shape
    offsets = _unit_rows(rng.standard_normal((rows, CLIPS_PER_EMBEDDING, dim)))
    cosine = rng.uniform(*CLIP_COSINE_RANGE, size=(rows, 1, 1))
    clips = _unit_rows(cosine * direction[:, None, :] + np.sqrt(1.0 - cosine**2) * offsets)
    return clips.mean(axis=1).astype(np.float32)


def unit_embeddings(rows: int, dim: int = EMBEDDING_DIM, seed: int = 0) -> np.ndarray:
    """Return float32 ``[rows, dim]`` random unit-norm embeddings (the other case tests cover)."""
    rng = np.random.default_rng(seed)
    return _unit_rows(rng.standard_normal((rows, dim))).astype(np.float32)
