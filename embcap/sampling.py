"""How the next token of each row is chosen: greedy, or sampled from its own seeded stream.

Every sampled row draws its noise from a counter-based stream: a hash of (the row's stream
seed, the position of the token being chosen, the token's rank), computed on the device.
So a row's tokens depend only on its own logits and its stream, never on which other rows
share the batch or in what order they came (a request is reproducible whatever else is
decoding), and the whole choice is a fixed sequence of tensor operations that a CUDA graph
can capture. Candidate `c` of a row uses the stream `stream_seed(seed, c)`, so the first n
candidates of a row are the same whether n or more are decoded.

Sampling is the Gumbel-max trick: argmax(logits / T + Gumbel noise) is a draw from
softmax(logits / T); top-k and top-p (nucleus) restrict the draw to the most likely tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Sampling:
    """How sampled rows choose (greedy rows take the argmax whatever these say)."""

    temperature: float = 1.0
    top_k: int = 0  # 0: every token
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int = 0


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply rounds) on int64 tensors holding values below 2**32.

    The multipliers are below 2**31, so no product leaves int64's range."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x6A09E667) & _MASK32
    return x ^ (x >> 16)


def stream_seed(seed: int, candidate: int) -> int:
    """The stream of candidate `candidate` of every row, for the model's `seed`."""
    mixed = _mix32(torch.tensor([(seed & _MASK32) ^ int(_mix32(torch.tensor([candidate + 1]))[0])]))
    return int(mixed[0])


def uniform_noise(streams: torch.Tensor, positions: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] float32 uniforms in (0, 1): column j of row b hashes (streams[b], positions[b], j)."""
    row = _mix32(_mix32(streams & _MASK32) ^ (positions & _MASK32))
    columns = torch.arange(width, device=streams.device)
    bits = _mix32(_mix32(row[:, None] ^ columns[None, :]) ^ 0x5BD1E995)
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))


def choose_tokens(logits: torch.Tensor, greedy: torch.Tensor, streams: torch.Tensor, positions: torch.Tensor,
                  sampling: Sampling | None) -> torch.Tensor:
    """[B, V] logits -> [B] token ids: the argmax where `greedy`, else a draw from the row's stream.

    `positions` is where each chosen token will sit (the counter of the stream); banned tokens
    must already be -inf in `logits`. With `sampling` None every row is greedy.
    """
    best = logits.argmax(-1)
    if sampling is None:
        return best
    scaled = logits.float() / sampling.temperature
    vocab = scaled.shape[-1]
    if 0 < sampling.top_k < vocab:
        values, indices = torch.topk(scaled, sampling.top_k, dim=-1)  # sorted, largest first
    elif sampling.top_p < 1.0:
        values, indices = torch.sort(scaled, dim=-1, descending=True)
    else:
        values, indices = scaled, None
    if sampling.top_p < 1.0:
        probabilities = values.softmax(-1)
        before = probabilities.cumsum(-1) - probabilities  # mass of the tokens ranked above each one
        values = values.masked_fill(before > sampling.top_p, float("-inf"))  # the top token always stays
    noise = uniform_noise(streams, positions, values.shape[-1])
    pick = (values - torch.log(-torch.log(noise))).argmax(-1)
    drawn = pick if indices is None else indices.gather(-1, pick[:, None])[:, 0]
    return torch.where(greedy, best, drawn)
