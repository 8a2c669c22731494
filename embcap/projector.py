"""The embedding-to-prefix projector (IBLlama shape)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class Projector(nn.Module):
    """Linear(E -> H*P) -> GELU -> LayerNorm -> Linear(H*P -> H*P), viewed as P vectors of size H."""

    def __init__(self, embedding_dim: int, hidden_size: int, prefix_length: int) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.hidden_size = hidden_size
        self.prefix_length = prefix_length
        width = hidden_size * prefix_length
        self.fc1 = nn.Linear(embedding_dim, width)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """Map [B, E] embeddings to [B, P, H] prefix vectors."""
        hidden = self.fc2(self.norm(self.act(self.fc1(embedding))))
        return hidden.reshape(-1, self.prefix_length, self.hidden_size)


def seeded_projector(embedding_dim: int, hidden_size: int, prefix_length: int, seed: int) -> Projector:
    """A freshly initialised projector whose weights depend only on `seed`."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return Projector(embedding_dim, hidden_size, prefix_length)
    finally:
        torch.random.set_rng_state(generator_state)


def save_projector(projector: Projector, path: str | Path) -> None:
    """Save the projector's state dict as safetensors."""
    tensors = {k: v.detach().contiguous() for k, v in projector.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def load_projector(path: str | Path, embedding_dim: int, hidden_size: int, prefix_length: int) -> Projector:
    """Load a projector and check its shapes against the checkpoint's settings."""
    projector = Projector(embedding_dim, hidden_size, prefix_length)
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
