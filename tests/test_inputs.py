"""The shared generator of evaluator-like embeddings (means of 15 unit vectors)."""

import numpy as np

from embcap.inputs import CLIPS_PER_EMBEDDING, realistic_embeddings, unit_embeddings
from embcap.contract import EMBEDDING_DIM


def test_realistic_embeddings_have_evaluator_norms() -> None:
    x = realistic_embeddings(1000, seed=3)
    assert x.shape == (1000, EMBEDDING_DIM) and x.dtype == np.float32
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    assert norms.max() <= 1.0 + 1e-6
    # Mostly 0.5-0.9, never unit norm, never the 1/sqrt(15) of independent clips.
    assert 0.6 < np.mean((norms > 0.5) & (norms < 0.9)) < 0.95
    assert norms.min() > 1 / np.sqrt(CLIPS_PER_EMBEDDING) and norms.max() < 0.99


def test_generators_are_deterministic_in_seed() -> None:
    assert np.array_equal(realistic_embeddings(4, seed=7), realistic_embeddings(4, seed=7))
    assert not np.array_equal(realistic_embeddings(4, seed=7), realistic_embeddings(4, seed=8))
    assert realistic_embeddings(0).shape == (0, EMBEDDING_DIM)
    np.testing.assert_allclose(np.linalg.norm(unit_embeddings(5, dim=32), axis=1), 1.0, rtol=1e-6)
