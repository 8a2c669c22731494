"""The project's caption encoder: a fixed orthonormal lift of all-MiniLM-L6-v2 into 1024-d."""

from __future__ import annotations

import numpy as np
import pytest

from embcap import text_encoder
from embcap.text_encoder import EMBEDDING_DIM, LIFT_SEED, SOURCE_DIM, encode_captions, encode_minilm, lift, lift_matrix


def test_lift_is_deterministic_and_documented_seed():
    fresh = text_encoder.lift_matrix.__wrapped__(LIFT_SEED)
    np.testing.assert_array_equal(fresh, lift_matrix())
    assert lift_matrix().shape == (SOURCE_DIM, EMBEDDING_DIM)
    assert not np.allclose(text_encoder.lift_matrix.__wrapped__(LIFT_SEED + 1), lift_matrix())


def test_lift_fingerprint_is_stable():
    """Pins the generated matrix so that a NumPy/LAPACK change cannot silently move the space."""
    matrix = lift_matrix()
    assert matrix[0, :3] == pytest.approx(FINGERPRINT_ROW0, abs=1e-9)
    assert float(matrix.sum()) == pytest.approx(FINGERPRINT_SUM, abs=1e-7)


def test_lift_rows_are_orthonormal():
    matrix = lift_matrix()
    np.testing.assert_allclose(matrix @ matrix.T, np.eye(SOURCE_DIM), atol=1e-12)


def test_lift_preserves_norms_and_cosines():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((32, SOURCE_DIM))
    lifted = lift(vectors).astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(lifted, axis=1), np.linalg.norm(vectors, axis=1), rtol=1e-6)
    np.testing.assert_allclose(lifted @ lifted.T, vectors @ vectors.T, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(text_encoder.unlift(lifted), vectors, atol=1e-5)


def test_lift_rejects_wrong_width():
    with pytest.raises(ValueError):
        lift(np.zeros((2, 100)))


def test_encode_captions_is_unit_norm_and_keeps_minilm_cosines():
    captions = ["a man is riding a horse on a beach", "a dog runs across a field", "a woman slices a tomato"]
    small = encode_minilm(captions)
    big = encode_captions(captions)
    assert big.shape == (3, EMBEDDING_DIM) and big.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(big, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(big @ big.T, small @ small.T, atol=1e-5)
    np.testing.assert_allclose(encode_captions(captions), big, atol=1e-6)
    assert encode_captions([]).shape == (0, EMBEDDING_DIM)


# Recorded from lift_matrix() with numpy 1.26.4 (RandomState(3841024), reduced QR, diag(R) > 0).
FINGERPRINT_ROW0 = [0.011950214688496219, 0.02663220532501149, 0.012478151205249446]
FINGERPRINT_SUM = 11.564529836470781
