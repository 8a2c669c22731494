"""Export the projector to ONNX and check it against PyTorch.

The checkpoint's input normalisation is part of `Projector.forward`, so it is exported as graph
operations: ONNX Runtime and a TensorRT engine built from this file apply it as PyTorch does.
"""

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


def parity_inputs(batch: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """`batch` rows to compare runtimes on: standard normal (norm near sqrt(dim)), evaluator-shaped clip means
    (norm 0.3-0.95) and, from 3 rows on, an all-zero row (the normalisation's floor)."""
    from embcap.inputs import realistic_embeddings

    x = rng.standard_normal((batch, dim)).astype(np.float32)
    x[1::2] = realistic_embeddings(len(x[1::2]), dim, seed=int(rng.integers(1 << 31)))
    if batch >= 3:
        x[2] = 0.0
    return x


def onnx_parity_error(projector: Projector, path: Path, batch_sizes: tuple[int, ...] = (1, 7), seed: int = 0,
                      providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> float:
    """Largest absolute difference between ONNX Runtime (with `providers`) and PyTorch on `parity_inputs`."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=list(providers))
    if session.get_providers()[0] != providers[0]:  # ONNX Runtime falls back without failing
        raise RuntimeError(f"{providers[0]} is not in use (ONNX Runtime chose {session.get_providers()})")
    rng = np.random.default_rng(seed)
    worst = 0.0
    for batch in batch_sizes:
        x = parity_inputs(batch, projector.embedding_dim, rng)
        (onnx_out,) = session.run([OUTPUT_NAME], {INPUT_NAME: x})
        with torch.no_grad():
            torch_out = projector(torch.from_numpy(x)).numpy()
        if onnx_out.shape != torch_out.shape:
            raise ValueError(f"ONNX output shape {onnx_out.shape} != torch {torch_out.shape}")
        worst = max(worst, float(np.max(np.abs(onnx_out - torch_out))))
    return worst
