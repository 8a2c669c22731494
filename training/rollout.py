"""Captions sampled from the model being trained, with their token ids, for the reward objectives.

Each row's candidates are decoded as serving decodes them (embcap.sampling): the stop tokens are banned
while a caption is still blank, greedy candidates take the argmax, and sampled ones draw from their own
counter-based stream with the checkpoint's rerank sampling (temperature, top-k, top-p). The streams of a
training step are a function of (seed, step, row, candidate) only, so a resumed run draws what an
uninterrupted one draws. One KV-cached decode of every row's candidates together, without gradients.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch

from embcap.generation import CaptionGenerator, is_visible
from embcap.sampling import Sampling, choose_tokens, stream_seed


@dataclass
class Rollout:
    """`count` candidates per row, row by row: the generated ids (ending with the stop token when the caption
    ended before the limit), the decoded texts, and whether each ended."""

    tokens: list[list[int]]
    texts: list[str]
    ended: list[bool]
    count: int

    def row(self, row: int) -> slice:
        """The candidates of `row`."""
        return slice(row * self.count, (row + 1) * self.count)


def step_streams(seed: int, step: int, rows: Sequence[int], count: int) -> list[int]:
    """The sampling stream of each candidate of each training row at `step` (row by row)."""
    streams = []
    for row in rows:
        base = int.from_bytes(hashlib.sha256(f"rollout:{seed}:{step}:{row}".encode()).digest()[:4], "little")
        streams += [stream_seed(base, candidate) for candidate in range(count)]
    return streams


@torch.no_grad()
def sample_captions(generator: CaptionGenerator, prefix: torch.Tensor, greedy: Sequence[bool],
                    sampling: Sampling | None, streams: Sequence[int], max_new_tokens: int) -> Rollout:
    """Decode len(greedy) candidates for each row of [B, P, H] `prefix`; candidate c is greedy when greedy[c].

    `streams` holds one stream per candidate of every row (`step_streams`). The model is put in eval mode for
    the decode and left in the mode it was in.
    """
    count, rows = len(greedy), prefix.shape[0]
    model, device = generator.model, generator.device
    embeds = generator.prompt_embeddings(prefix).repeat_interleave(count, dim=0)
    total = embeds.shape[0]
    if len(streams) != total:
        raise ValueError(f"{len(streams)} streams for {rows} rows x {count} candidates")
    greedy_rows = torch.tensor(list(greedy) * rows, device=device)
    stream_ids = torch.tensor(list(streams), dtype=torch.long, device=device)
    stop = torch.tensor(generator.stop_ids, device=device)
    tokens: list[list[int]] = [[] for _ in range(total)]
    ended, visible = [False] * total, [False] * total
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        past, inputs = None, embeds
        for position in range(max_new_tokens):
            out = model(inputs_embeds=inputs, attention_mask=mask, cache=past, use_cache=True)
            past = out.cache
            logits = out.logits[:, -1].float()
            blank = [index for index in range(total) if not visible[index]]
            if blank:  # a caption never ends before it has visible text (serving's BlankGuard)
                logits[torch.tensor(blank, device=device)[:, None], stop[None, :]] = float("-inf")
            chosen = choose_tokens(logits, greedy_rows, stream_ids,
                                   torch.full((total,), position, dtype=torch.long, device=device), sampling)
            for index, token in enumerate(chosen.tolist()):
                if ended[index]:
                    continue
                tokens[index].append(token)
                if token in generator.stop_ids:
                    ended[index] = True
                elif not visible[index]:
                    visible[index] = is_visible(generator.decode(tokens[index]))
            if all(ended):
                break
            inputs = model.get_input_embeddings()(chosen[:, None])
            mask = torch.cat([mask, torch.ones((total, 1), dtype=torch.long, device=device)], dim=1)
    finally:
        model.train(was_training)
    texts = [generator.decode([t for t in ids if t not in generator.stop_ids]) for ids in tokens]
    return Rollout(tokens, texts, ended, count)


__all__ = ["Rollout", "sample_captions", "step_streams"]
