"""The embedding-to-prefix projector (IBLlama shape), with the checkpoint's input normalisation.

The normalisation is part of `Projector.forward`, so the ONNX export (and a TensorRT engine built
from it) carries it as graph operations: every runtime applies the same arithmetic.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from embcap.checkpoint import INPUT_NORMS, InputNorm

# Below this length an embedding is divided by NORM_FLOOR instead of its length (an all-zero row stays zero,
# never NaN); far below the evaluator's norms (about 0.3 and up) and representable in float16.
NORM_FLOOR = 1e-4


def unit_rows(embedding: torch.Tensor) -> torch.Tensor:
    """Each row divided by its L2 length (at least NORM_FLOOR), written with plain ops (Mul, ReduceSum, Sqrt,
    Clip, Div) that ONNX and TensorRT run as they are."""
    length = torch.sqrt(torch.sum(embedding * embedding, dim=-1, keepdim=True))
    return embedding / torch.clamp(length, min=NORM_FLOOR)


class Projector(nn.Module):
    """[optional unit length] -> Linear(E -> H*P) -> GELU -> LayerNorm -> Linear(H*P -> H*P), viewed as P vectors
    of size H."""

    def __init__(self, embedding_dim: int, hidden_size: int, prefix_length: int,
                 input_norm: InputNorm = "none") -> None:
        super().__init__()
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {', '.join(INPUT_NORMS)}, not {input_norm!r}")
        self.embedding_dim = embedding_dim
        self.hidden_size = hidden_size
        self.prefix_length = prefix_length
        self.input_norm = input_norm
        width = hidden_size * prefix_length
        self.fc1 = nn.Linear(embedding_dim, width)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """Map [B, E] embeddings to [B, P, H] prefix vectors."""
        if self.input_norm == "unit":
            embedding = unit_rows(embedding)
        hidden = self.fc2(self.norm(self.act(self.fc1(embedding))))
        return hidden.reshape(-1, self.prefix_length, self.hidden_size)


def seeded_projector(embedding_dim: int, hidden_size: int, prefix_length: int, seed: int,
                     input_norm: InputNorm = "none") -> Projector:
    """A freshly initialised projector whose weights depend only on `seed`."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return Projector(embedding_dim, hidden_size, prefix_length, input_norm)
    finally:
        torch.random.set_rng_state(generator_state)


def save_projector(projector: Projector, path: str | Path) -> None:
    """Save the projector's state dict as safetensors."""
    tensors = {k: v.detach().contiguous() for k, v in projector.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def load_projector(path: str | Path, embedding_dim: int, hidden_size: int, prefix_length: int,
                   input_norm: InputNorm = "none") -> Projector:
    """Load a projector and check its shapes against the checkpoint's settings (`input_norm` is the checkpoint's
    `input_norm`; it has no weights)."""
    projector = Projector(embedding_dim, hidden_size, prefix_length, input_norm)
    state = load_file(str(path))
    expected = {k: tuple(v.shape) for k, v in projector.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        raise ValueError(
            f"projector {path} does not match embedding_dim={embedding_dim}, "
            f"hidden_size={hidden_size}, prefix_length={prefix_length}: expected {expected}, found {found}"
        )
    projector.load_state_dict(state)
    return projector.eval()
