"""Projector shape, checkpoint loading, input normalisation and ONNX parity (TensorRT on a GPU)."""

import json

import numpy as np
import pytest
import torch

from embcap.checkpoint import SPEC_FILE, load_checkpoint
from embcap.inputs import realistic_embeddings
from embcap.loading import resolve_checkpoint
from embcap.projector import NORM_FLOOR, Projector, load_projector, save_projector, seeded_projector
from export.onnx_projector import (INPUT_NAME, OUTPUT_NAME, PARITY_TOLERANCE, export_projector_onnx,
                                   onnx_parity_error)

ort = pytest.importorskip("onnxruntime")


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


def _onnx(path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def test_unit_input_norm_makes_the_projector_blind_to_length():
    x = torch.from_numpy(realistic_embeddings(6, seed=3))
    unit = seeded_projector(1024, 32, 2, seed=4, input_norm="unit").eval()
    plain = seeded_projector(1024, 32, 2, seed=4).eval()
    with torch.no_grad():
        assert torch.allclose(unit(x), unit(x / x.norm(dim=1, keepdim=True)), atol=1e-5)
        assert torch.allclose(unit(0.5 * x), unit(x), atol=1e-5)
        assert torch.allclose(unit(x / x.norm(dim=1, keepdim=True)), plain(x / x.norm(dim=1, keepdim=True)), atol=1e-6)
        assert not torch.allclose(plain(0.5 * x), plain(x), atol=1e-2)
        zero = unit(torch.zeros(1, 1024))
    assert torch.isfinite(zero).all() and torch.allclose(zero, plain(torch.zeros(1, 1024)))
    tiny = torch.full((1, 1024), NORM_FLOOR / 1024)  # below the floor: divided by the floor, not blown up
    with torch.no_grad():
        assert torch.allclose(unit(tiny), plain(tiny / NORM_FLOOR))


def test_unknown_input_norm_is_refused():
    with pytest.raises(ValueError, match="input_norm must be one of none, unit"):
        Projector(1024, 16, 2, input_norm="l2")


def test_onnx_graph_carries_the_input_norm(tmp_path):
    unit = seeded_projector(1024, 64, 2, seed=1, input_norm="unit").eval()
    export_projector_onnx(unit, tmp_path / "unit.onnx")
    export_projector_onnx(seeded_projector(1024, 64, 2, seed=1).eval(), tmp_path / "plain.onnx")
    assert onnx_parity_error(unit, tmp_path / "unit.onnx", batch_sizes=(1, 5, 33)) < PARITY_TOLERANCE
    x = realistic_embeddings(9, seed=5)
    x[4] = 0.0
    out = _onnx(tmp_path / "unit.onnx", x)
    assert np.isfinite(out).all()
    assert np.allclose(out, _onnx(tmp_path / "unit.onnx", 3.0 * x), atol=1e-5)  # the length is divided out in-graph
    assert not np.allclose(out, _onnx(tmp_path / "plain.onnx", x), atol=1e-2)


def test_export_applies_the_checkpoints_input_norm(tiny_checkpoint, tmp_path):
    """A checkpoint with input_norm unit: the exported repository's ONNX equals the loaded PyTorch projector and
    ignores the length of its input."""
    from export.repository import ONNX_FILE, export_repository

    spec = json.loads((tiny_checkpoint / SPEC_FILE).read_text())
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    for item in tiny_checkpoint.iterdir():
        (checkpoint / item.name).symlink_to(item)
    (checkpoint / SPEC_FILE).unlink()
    (checkpoint / SPEC_FILE).write_text(json.dumps({**spec, "input_norm": "unit"}))
    assert load_checkpoint(checkpoint).spec.input_norm == "unit"
    projector = resolve_checkpoint(checkpoint).load_projector()
    assert projector.input_norm == "unit"
    repository = export_repository(checkpoint, tmp_path / "repository", log=lambda _: None)
    x = realistic_embeddings(7, seed=9)
    with torch.no_grad():
        expected = projector(torch.from_numpy(x)).numpy()
    onnx_out = _onnx(repository / ONNX_FILE, x)
    assert np.max(np.abs(onnx_out - expected)) < PARITY_TOLERANCE
    assert np.allclose(_onnx(repository / ONNX_FILE, x / np.linalg.norm(x, axis=1, keepdims=True)), onnx_out,
                       atol=1e-5)


@pytest.mark.gpu
def test_tensorrt_engine_matches_torch_with_the_input_norm(tmp_path):
    """The projector's TensorRT path (ONNX Runtime's TensorRT provider, as model_repository/projector runs it)."""
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no TensorRT execution provider")
    unit = seeded_projector(1024, 64, 2, seed=1, input_norm="unit").eval()
    export_projector_onnx(unit, tmp_path / "unit.onnx")
    error = onnx_parity_error(unit, tmp_path / "unit.onnx", batch_sizes=(1, 5, 33),
                              providers=("TensorrtExecutionProvider",))
    assert error < PARITY_TOLERANCE
