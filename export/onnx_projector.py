"""Export the projector to ONNX and check it against PyTorch."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from embcap.projector import Projector

PARITY_TOLERANCE = 1e-4
INPUT_NAME = "embedding"
OUTPUT_NAME = "prefix"


def export_projector_onnx(projector: Projector, path: Path, opset: int = 17) -> None:
    """Write `projector` as ONNX with a dynamic batch dimension."""
    example = torch.zeros(2, projector.embedding_dim)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(
            projector.eval(),
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
        )


def onnx_parity_error(projector: Projector, path: Path, batch_sizes: tuple[int, ...] = (1, 7), seed: int = 0) -> float:
    """Largest absolute difference between ONNX Runtime and PyTorch on random inputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    worst = 0.0
    for batch in batch_sizes:
        x = rng.standard_normal((batch, projector.embedding_dim)).astype(np.float32)
        (onnx_out,) = session.run([OUTPUT_NAME], {INPUT_NAME: x})
        with torch.no_grad():
            torch_out = projector(torch.from_numpy(x)).numpy()
        if onnx_out.shape != torch_out.shape:
            raise ValueError(f"ONNX output shape {onnx_out.shape} != torch {torch_out.shape}")
        worst = max(worst, float(np.max(np.abs(onnx_out - torch_out))))
    return worst
