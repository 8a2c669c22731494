"""Projector shape, checkpoint loading and ONNX parity."""

import numpy as np
import pytest
import torch

from embcap.projector import Projector, load_projector, save_projector, seeded_projector
from export.onnx_projector import PARITY_TOLERANCE, export_projector_onnx, onnx_parity_error


def test_reference_shape_and_output():
    projector = Projector(embedding_dim=1024, hidden_size=48, prefix_length=3)
    layers = [type(m).__name__ for m in projector.children()]
    assert layers == ["Linear", "GELU", "LayerNorm", "Linear"]
    assert projector.fc1.weight.shape == (144, 1024) and projector.fc2.weight.shape == (144, 144)
    assert projector(torch.zeros(5, 1024)).shape == (5, 3, 48)


def test_seeded_projector_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = seeded_projector(1024, 16, 2, seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    b = seeded_projector(1024, 16, 2, seed=7)
    c = seeded_projector(1024, 16, 2, seed=8)
    assert torch.equal(a.fc1.weight, b.fc1.weight)
    assert not torch.equal(a.fc1.weight, c.fc1.weight)


def test_load_rejects_mismatched_shape(tmp_path):
    path = tmp_path / "projector.safetensors"
    save_projector(seeded_projector(1024, 16, 2, seed=0), path)
    assert load_projector(path, 1024, 16, 2)(torch.zeros(1, 1024)).shape == (1, 2, 16)
    with pytest.raises(ValueError, match="does not match"):
        load_projector(path, 1024, 32, 2)


def test_onnx_matches_torch(tmp_path):
    projector = seeded_projector(1024, 64, 2, seed=1).eval()
    path = tmp_path / "projector.onnx"
    export_projector_onnx(projector, path)
    error = onnx_parity_error(projector, path, batch_sizes=(1, 5, 33))
    assert error < PARITY_TOLERANCE


def test_onnx_parity_detects_a_different_model(tmp_path):
    path = tmp_path / "projector.onnx"
    export_projector_onnx(seeded_projector(1024, 64, 2, seed=1), path)
    assert onnx_parity_error(seeded_projector(1024, 64, 2, seed=2).eval(), path) > 1e-2
