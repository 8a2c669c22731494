"""ImageBind's text tower on its own: the model the evaluator scores captions with, without the other modalities.

Its folder format is embcap.tower_folder's.

`TextTower` computes what `ImageBindModel.forward({"text": ids})["text"]` computes before its
normalisation: token + learned position embeddings, pre-norm blocks of multi-head self-attention under
a causal mask and a GELU MLP, then LayerNorm and a bias-free projection at the position of the largest
id (the end token, or the largest id of a piece cut without one). Positions after that one cannot reach
it through the causal mask, so a batch runs only as far as its longest pooled position.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from embcap.tower_folder import CONFIG_FILE, FORMAT, WEIGHTS_FILE, TowerConfig, TowerError, read_config

class Block(nn.Module):
    """Pre-norm residual block: self-attention under a causal mask, then a GELU MLP (optional layer scales)."""

    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.norm_1 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.attn_in = nn.Linear(config.width, 3 * config.width)
        self.attn_out = nn.Linear(config.width, config.width)
        self.norm_2 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.fc1 = nn.Linear(config.width, config.mlp_width)
        self.fc2 = nn.Linear(config.mlp_width, config.width)
        if config.layer_scale:
            self.gamma_1 = nn.Parameter(torch.ones(config.width))
            self.gamma_2 = nn.Parameter(torch.ones(config.width))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.attn_in(self.norm_1(x)).view(batch, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        attended = self.attn_out(attended.transpose(1, 2).reshape(batch, length, width))
        x = x + (attended if self.gamma_1 is None else attended * self.gamma_1)
        mlp = self.fc2(F.gelu(self.fc1(self.norm_2(x))))
        return x + (mlp if self.gamma_2 is None else mlp * self.gamma_2)


class TextTower(nn.Module):
    """Token ids [B, L <= context_length] -> [B, output_dim] text embeddings (not normalised)."""

    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.zeros(config.context_length, config.width))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.final_norm = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.projection = nn.Linear(config.width, config.output_dim, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pooled = ids.argmax(dim=-1)  # the first largest id, as ImageBind pools
        length = int(pooled.max()) + 1
        x = self.token_embedding(ids[:, :length]) + self.positional_embedding[:length]
        for block in self.blocks:
            x = block(x)
        return self.projection(self.final_norm(x[torch.arange(len(ids), device=ids.device), pooled]))


def load_tower(folder: str | Path, device: str | torch.device = "cpu") -> TextTower:
    """The tower of `folder` in eval mode on `device`, with its stored dtype; TowerError naming a bad file."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_config(folder)
    with torch.device("meta"):
        tower = TextTower(config)
    try:
        state = load_file(folder / WEIGHTS_FILE, device=str(device))
        tower.load_state_dict(state, strict=True, assign=True)
    except Exception as exc:  # a truncated file, a missing tensor or a shape other than the config's
        raise TowerError(f"{folder / WEIGHTS_FILE} does not hold the tower {CONFIG_FILE} describes: "
                         f"{type(exc).__name__}: {str(exc)[:400]}") from exc
    return tower.eval()


def save_tower(tower: TextTower, folder: Path) -> None:
    """Write the config and weights of `tower` into `folder` (the caller adds the vocabulary and the card)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous() for name, tensor in tower.state_dict().items()}
    save_file(state, folder / WEIGHTS_FILE, metadata={"format": FORMAT})
    (folder / CONFIG_FILE).write_text(tower.config.model_dump_json(indent=2) + "\n")
