"""Iteration-level batching: rows join the running batch at any step and leave at their own end.

`RunningBatch` is the host half of the continuous engine. It gives each row a slot
of a `SlotKVDecoder`, prefills new rows on their own (after a copy of the prompt
start's KV, which is the same for every row and computed once), runs one decode
step for all rows, and applies the caption rules after every token. Rows always
fill slots 0..n-1: when a row leaves, the last row moves into its slot, so a step
computes n rows (on a GPU, the smallest captured batch size of at least n).

With N candidates per prompt (`CandidatePlan`, best-of-N), each prompt takes N slots:
its prompt is prefilled once and its KV copied into the other N-1 slots, and each
slot then decodes on its own (greedy, or from its own sampling stream) as a row of
its own. The caption rules hold per row:

- a stop token ends a row, except before `min_new_tokens` and while the row's text
  is still blank (an empty caption drops the evaluator's whole batch, so stop tokens
  stay banned until the row has visible text);
- `max_new_tokens` ends a row; a row still blank then gets `BLANK_FALLBACK`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

import numpy as np
import torch

from embcap.candidates import CandidatePlan, candidate_plan
from embcap.generation import BLANK_FALLBACK, CaptionGenerator, is_visible
from embcap.engines.continuous.slot_decoder import SlotKVDecoder, bucket_sizes


@dataclass
class Row:
    """One caption being written: the caller's key, its slot and its tokens so far."""

    key: Hashable
    slot: int
    tokens: list[int] = field(default_factory=list)
    visible: bool = False
    done: bool = False
    text: str = ""
    fallback: bool = False  # ended blank at max_new_tokens and got BLANK_FALLBACK


class RunningBatch:
    """Up to `slots` rows decoding together, each at its own position; `plan` says what each of a
    prompt's candidates does (default: one candidate per prompt, decoded as `generation` says)."""

    def __init__(self, generator: CaptionGenerator, slots: int, use_graphs: bool | None = None,
                 plan: CandidatePlan | None = None, attention_backend: str = "auto") -> None:
        settings = generator.spec.generation
        self.generator = generator
        self.settings = settings
        self.plan = plan or candidate_plan(generator.spec, 1)
        self.stop_ids = set(generator.stop_ids)
        self.decoder = SlotKVDecoder(generator.lean, slots, generator.prompt_length + settings.max_new_tokens,
                                     generator.stop_ids, self.plan.sampling, use_graphs, attention_backend)
        self.buckets = bucket_sizes(slots)
        self.start_length = generator.prompt_start.shape[1]
        self.start_kv = self.decoder.prompt_start(generator.prompt_start) if self.start_length else None
        self.decoder.capture(self.buckets)
        self.rows: dict[int, Row] = {}  # slot -> row; the slots in use are always 0..len(rows)-1

    @property
    def capacity(self) -> int:
        return self.decoder.slots

    @property
    def free_slots(self) -> int:
        return self.capacity - len(self.rows)

    @property
    def active(self) -> int:
        return len(self.rows)

    def _ban_stop(self, row: Row) -> bool:
        return len(row.tokens) < self.settings.min_new_tokens or not row.visible

    @torch.inference_mode()
    def add(self, prefix: np.ndarray | torch.Tensor, keys: list[Hashable]) -> list[Row]:
        """Prefill [N, P, H] prefix rows into free slots, each as the plan's C candidates: `keys` holds
        N * C keys, prompt by prompt (candidates 0..C-1 of prompt 0 first). They decode from the next step."""
        per_prompt = self.plan.count
        count = len(keys)
        if count != len(prefix) * per_prompt:
            raise ValueError(f"{len(prefix)} prefix rows x {per_prompt} candidates but {count} keys")
        if count > self.free_slots:
            raise ValueError(f"{count} rows do not fit: {self.free_slots} free slots")
        slots = list(range(self.active, self.active + count))
        groups = [slots[i:i + per_prompt] for i in range(0, count, per_prompt)]
        embeds = self.generator.prompt_embeddings(torch.as_tensor(prefix))[:, self.start_length:]
        if self.start_kv is not None:
            self.decoder.copy_prefix([group[0] for group in groups], *self.start_kv)
        rows = [Row(key, slot) for key, slot in zip(keys, slots)]
        ban = torch.tensor([self._ban_stop(row) for row in rows], dtype=torch.bool)
        greedy = torch.tensor(self.plan.greedy * len(groups), dtype=torch.bool)
        streams = torch.tensor(self.plan.streams * len(groups), dtype=torch.long)
        first = self.decoder.prefill(groups, embeds, self.start_length, ban, greedy, streams)
        for row in rows:
            self.rows[row.slot] = row
        self._record(rows, first.tolist())
        return rows

    @torch.inference_mode()
    def step(self) -> None:
        """One decode step for every active row that is not done yet."""
        live = [row for row in self.rows.values() if not row.done]
        if not live:
            return
        batch = self.active  # rows fill slots 0..active-1
        if self.decoder.use_graphs:
            batch = next(b for b in self.buckets if b >= batch)
        ban = [False] * batch
        for row in live:
            ban[row.slot] = self._ban_stop(row)
        self.decoder.ban_stop[:batch].copy_(torch.tensor(ban, dtype=torch.bool))
        tokens = self.decoder.decode(batch).tolist()
        self._record(live, [tokens[row.slot] for row in live])

    def _record(self, rows: list[Row], tokens: list[int]) -> None:
        max_new = self.settings.max_new_tokens
        for row, token in zip(rows, tokens):
            if token in self.stop_ids:  # only possible once the row has visible text
                row.done = True
                continue
            row.tokens.append(token)
            if not row.visible:
                row.visible = is_visible(self.generator.decode(row.tokens))
            row.done = len(row.tokens) >= max_new

    def take_finished(self) -> list[Row]:
        """Rows that are done, with their text, removed from the batch (their slots are free again)."""
        finished = [row for row in self.rows.values() if row.done]
        for row in finished:
            text = self.generator.decode(row.tokens)
            row.fallback = not is_visible(text)
            row.text = BLANK_FALLBACK if row.fallback else text
            self._release(row)
        return finished

    def drop(self, keys: set[Hashable]) -> int:
        """Remove the rows with these keys (cancelled requests) without finishing them; returns how many."""
        dropped = [row for row in self.rows.values() if row.key in keys]
        for row in dropped:
            self._release(row)
        return len(dropped)

    def forget_from(self, slot: int) -> None:
        """Drop the rows in slots `slot` and above without touching the device (after a failure: the
        slots stay contiguous, and whatever the device holds there is overwritten by the next prefill)."""
        for index in [index for index in self.rows if index >= slot]:
            del self.rows[index]

    def _release(self, row: Row) -> None:
        """Free the row's slot; the row in the last slot moves into it, so slots stay contiguous."""
        del self.rows[row.slot]
        last = len(self.rows)
        if row.slot != last:
            moved = self.rows.pop(last)
            self.decoder.move_slot(last, row.slot)
            moved.slot = row.slot
            self.rows[row.slot] = moved
