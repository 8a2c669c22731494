"""Captions as token sequences after the prompt, and what the model being trained says about them: the
teacher-forced cross-entropy of a batch (the default objective) and each sequence's summed log-probability
(the policy term of the reward objective)."""

from __future__ import annotations

import torch

from embcap.generation import CaptionGenerator
from embcap.projector import Projector


def caption_ids(tokenizer, captions: list[str], end_id: int, max_tokens: int) -> list[list[int]]:
    """Token ids of " caption" (leading space, as it follows "Caption:"), cut to `max_tokens` with the end token."""
    encoded = tokenizer([" " + c for c in captions], add_special_tokens=False)["input_ids"]
    return [ids[: max_tokens - 1] + [end_id] for ids in encoded]


def _forward(generator: CaptionGenerator, prompt: torch.Tensor, targets: list[list[int]], keep: int | None = None):
    """The decoder over [prompt | target tokens] (right-padded); returns (output, ids, mask of the target tokens)."""
    device = generator.device
    batch, prompt_len = prompt.shape[:2]
    width = max(len(t) for t in targets)
    ids = torch.full((batch, width), generator.pad_id, dtype=torch.long)
    mask = torch.zeros((batch, prompt_len + width), dtype=torch.long)
    for row, target in enumerate(targets):
        ids[row, : len(target)] = torch.tensor(target, dtype=torch.long)
        mask[row, : prompt_len + len(target)] = 1
    token_embeds = generator.model.get_input_embeddings()(ids.to(device))
    extra = {} if keep is None else {"logits_to_keep": keep}
    out = generator.model(inputs_embeds=torch.cat([prompt, token_embeds], dim=1), attention_mask=mask.to(device),
                          **extra)
    return out, ids.to(device), mask[:, prompt_len:].to(device)


def batch_loss(generator: CaptionGenerator, projector: Projector, embeddings: torch.Tensor,
               targets: list[list[int]]) -> torch.Tensor:
    """Teacher-forced cross-entropy over caption tokens given the conditioning embeddings (mean per token)."""
    logprobs, mask = token_logprobs(generator, generator.prompt_embeddings(projector(embeddings.to(generator.device))),
                                    targets)
    return -(logprobs * mask).sum() / mask.sum()


def token_logprobs(generator: CaptionGenerator, prompt: torch.Tensor,
                   targets: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, W] log-probability of each target token after `prompt` [N, L, H], [N, W] mask of real tokens)."""
    width = max(len(t) for t in targets)
    # logits of the last prompt position and of every target token but the last: they predict the targets
    out, ids, mask = _forward(generator, prompt, targets, keep=width + 1)
    logits = out.logits[:, :-1].float()
    picked = logits.gather(-1, ids[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)
    return picked, mask.to(picked.dtype)


def sequence_logprobs(generator: CaptionGenerator, prompt: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
    """[N] summed log-probability of each target sequence after its prompt row."""
    logprobs, mask = token_logprobs(generator, prompt, targets)
    return (logprobs * mask).sum(dim=1)


__all__ = ["batch_loss", "caption_ids", "sequence_logprobs", "token_logprobs"]
