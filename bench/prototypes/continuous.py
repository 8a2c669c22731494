"""Prototype: a hand-written KV-cached decode loop with iteration-level (continuous) batching.

`ContinuousDecoder` keeps one batch of active rows. Rows join at any step (their
prompt is prefilled on its own, then its KV cache is left-padded and concatenated
to the running batch) and leave as soon as they hit a stop token or
max_new_tokens (their KV rows are dropped, and all-padding columns trimmed). With
a per-row attention mask and per-row position ids the result equals decoding each
row alone (up to float rounding), as HF generate() does.

`FastCaptionGenerator` is a drop-in CaptionGenerator whose generate() runs this
loop for one request-level batch (no HF generate(): no logits processors, logits
only for the last position, finished rows leave the batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from embcap.generation import CaptionGenerator


@dataclass
class Row:
    key: object  # caller's handle (request, index)
    tokens: list[int] = field(default_factory=list)
    done: bool = False


def _pad_left(tensor: torch.Tensor, amount: int, dim: int) -> torch.Tensor:
    if amount == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = amount
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class ContinuousDecoder:
    """Iteration-level batched greedy/sampled decoding over a CaptionGenerator's model."""

    def __init__(self, generator: CaptionGenerator) -> None:
        from transformers import DynamicCache

        self.g = generator
        self.model = generator.model
        self.settings = generator.spec.generation
        self.stop = torch.tensor(generator.stop_ids, dtype=torch.long)
        self._cache_cls = DynamicCache
        self.rows: list[Row] = []
        self.cache = None  # DynamicCache over the active rows
        self.mask: torch.Tensor | None = None  # [B, T] 1 = real token, 0 = left padding
        self.positions: torch.Tensor | None = None  # [B] next position id per row
        self.next_tokens: torch.Tensor | None = None  # [B] token to feed at the next step
        self.generator = torch.Generator().manual_seed(self.settings.seed)
        self.shared = self._shared_prompt_cache()

    @torch.inference_mode()
    def _shared_prompt_cache(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """KV of the prompt text before the prefix: the same for every row, computed once."""
        before = self.g._before
        if before.shape[1] == 0:
            return None
        cache = self._cache_cls(config=self.model.config)
        self.model(inputs_embeds=before, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return [(layer.keys, layer.values) for layer in cache.layers]

    @property
    def active(self) -> int:
        return len(self.rows)

    def _choose(self, logits: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        """Next token per row from [B, V] logits; stop tokens are banned below min_new_tokens."""
        logits = logits.float()
        young = generated < self.settings.min_new_tokens
        if young.any():
            logits[young.nonzero(as_tuple=True)[0][:, None], self.stop[None, :]] = float("-inf")
        if not self.settings.do_sample:
            return logits.argmax(-1)
        logits = logits / self.settings.temperature
        if self.settings.top_k:
            k = min(self.settings.top_k, logits.shape[-1])
            threshold = torch.topk(logits, k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < threshold, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)

    @torch.inference_mode()
    def add(self, prefix: torch.Tensor, keys: list) -> None:
        """Prefill [N, P, H] prefix rows and join them to the running batch."""
        embeds = self.g.prompt_embeddings(torch.as_tensor(prefix))
        count, length = embeds.shape[:2]
        cache = self._cache_cls(config=self.model.config)
        if self.shared is not None:  # prefill only what follows the shared prompt start
            for index, (shared_k, shared_v) in enumerate(self.shared):
                cache.update(shared_k.expand(count, -1, -1, -1).contiguous(),
                             shared_v.expand(count, -1, -1, -1).contiguous(), index)
            embeds = embeds[:, self.g._before.shape[1]:]
        out = self.model(inputs_embeds=embeds, past_key_values=cache, use_cache=True, logits_to_keep=1)
        first = self._choose(out.logits[:, -1], torch.zeros(count, dtype=torch.long))
        new_mask = torch.ones(count, length, dtype=torch.long)
        new_positions = torch.full((count,), length, dtype=torch.long)
        if self.cache is None:
            self.cache, self.mask, self.positions, self.next_tokens = cache, new_mask, new_positions, first
        else:
            old_len, new_len = self.mask.shape[1], length
            width = max(old_len, new_len)
            for old_layer, new_layer in zip(self.cache.layers, cache.layers):
                old_layer.keys = torch.cat([_pad_left(old_layer.keys, width - old_len, 2),
                                            _pad_left(new_layer.keys, width - new_len, 2)], dim=0)
                old_layer.values = torch.cat([_pad_left(old_layer.values, width - old_len, 2),
                                              _pad_left(new_layer.values, width - new_len, 2)], dim=0)
            self.mask = torch.cat([_pad_left(self.mask, width - old_len, 1),
                                   _pad_left(new_mask, width - new_len, 1)], dim=0)
            self.positions = torch.cat([self.positions, new_positions])
            self.next_tokens = torch.cat([self.next_tokens, first])
        rows = [Row(key) for key in keys]
        self.rows.extend(rows)
        self._record(rows, first)

    def _record(self, rows: list[Row], tokens: torch.Tensor) -> None:
        """Append each row's new token; a stop token or max_new_tokens finishes the row."""
        max_new = self.settings.max_new_tokens
        for row, token in zip(rows, tokens.tolist()):
            if token in self.g.stop_ids:
                row.done = True
            else:
                row.tokens.append(token)
                row.done = len(row.tokens) >= max_new

    def _drop_finished(self) -> list[Row]:
        done = [row for row in self.rows if row.done]
        if not done:
            return []
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.positions = self.next_tokens = None
            return done
        index = torch.tensor(keep, dtype=torch.long)
        self.mask = self.mask[index]
        pad = int((self.mask.cumsum(1) == 0).sum(1).min())  # columns that are padding for every row
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, pad:]
            layer.values = layer.values[index, :, pad:]
        self.mask = self.mask[:, pad:]
        self.positions = self.positions[index]
        self.next_tokens = self.next_tokens[index]
        return done

    def take_finished(self) -> list[Row]:
        """Rows that are complete (removed from the batch)."""
        return self._drop_finished()

    @torch.inference_mode()
    def step(self) -> None:
        """One decode step for every active row."""
        if not self.rows:
            return
        self._drop_finished()
        if not self.rows:
            return
        batch = len(self.rows)
        self.mask = torch.cat([self.mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
        out = self.model(input_ids=self.next_tokens[:, None], attention_mask=self.mask,
                         position_ids=self.positions[:, None], past_key_values=self.cache, use_cache=True,
                         logits_to_keep=1)
        self.positions = self.positions + 1
        generated = torch.tensor([len(r.tokens) for r in self.rows], dtype=torch.long)
        self.next_tokens = self._choose(out.logits[:, -1], generated)
        self._record(self.rows, self.next_tokens)

    def text(self, row: Row) -> str:
        return self.g.tokenizer.decode(row.tokens, skip_special_tokens=True).strip()


class FastCaptionGenerator(CaptionGenerator):
    """CaptionGenerator with the hand-written loop (request-level batch)."""

    @torch.inference_mode()
    def generate(self, prefix: np.ndarray | torch.Tensor) -> list[str]:
        prefix = self._check(prefix)
        if prefix.shape[0] == 0:
            return []
        decoder = ContinuousDecoder(self)
        decoder.add(prefix, list(range(prefix.shape[0])))
        texts: dict[int, str] = {}
        while decoder.active:
            for row in decoder.take_finished():
                texts[row.key] = decoder.text(row)
            decoder.step()
        return [texts[i] for i in range(prefix.shape[0])]
