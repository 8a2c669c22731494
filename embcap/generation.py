"""Batched caption generation from prefix vectors with a Llama-family decoder."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from embcap.checkpoint import PREFIX_PLACEHOLDER, CaptionModelSpec, CheckpointError

if TYPE_CHECKING:
    from embcap.candidates import CandidatePlan
    from embcap.lean_llama import LeanLlama

# What a row gets when it reaches max_new_tokens with no visible text: an empty caption
# would make the evaluator drop the request's whole batch.
BLANK_FALLBACK = "A short video."


def is_visible(text: str) -> bool:
    """True when `text` has a character other than whitespace."""
    return bool(text.strip())


@dataclass(frozen=True)
class PromptIds:
    """Token ids of the prompt text before and after the prefix vectors."""

    before: list[int]
    after: list[int]


def prompt_ids(tokenizer, spec: CaptionModelSpec) -> PromptIds:
    """Tokenise the prompt template around the `{prefix}` placeholder."""
    template = spec.prompt.template
    if spec.prompt.chat:
        template = tokenizer.apply_chat_template(
            [{"role": "user", "content": template}], tokenize=False, add_generation_prompt=True
        )
        if template.count(PREFIX_PLACEHOLDER) != 1:
            raise CheckpointError("the tokenizer's chat template altered the {prefix} placeholder")
    before_text, after_text = template.split(PREFIX_PLACEHOLDER)
    before = tokenizer(before_text, add_special_tokens=False)["input_ids"]
    after = tokenizer(after_text, add_special_tokens=False)["input_ids"]
    if spec.prompt.add_bos:
        if tokenizer.bos_token_id is None:
            raise CheckpointError("prompt.add_bos is set but the tokenizer has no BOS token")
        before = [tokenizer.bos_token_id, *before]
    return PromptIds(before=list(before), after=list(after))


def stop_token_ids(tokenizer, spec: CaptionModelSpec) -> list[int]:
    """EOS plus the checkpoint's extra stop tokens, each of which must be a single token."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    for token in spec.generation.stop_tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise CheckpointError(f"stop token {token!r} is not a single token of this tokenizer")
        ids.append(int(token_id))
    if not ids:
        raise CheckpointError("the decoder has no EOS token and the checkpoint names no stop_tokens")
    return sorted(set(ids))


class BlankGuard:
    """Logits processor: bans the stop tokens in every row whose text so far is still blank."""

    def __init__(self, decode, stop_ids: list[int]) -> None:
        self.decode = decode
        self.stop_ids = stop_ids
        self.visible: list[bool] | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.visible is None:
            self.visible = [False] * input_ids.shape[0]
        blank = []
        for row, tokens in enumerate(input_ids.tolist()):
            if not self.visible[row]:
                self.visible[row] = is_visible(self.decode(tokens))
                if not self.visible[row]:
                    blank.append(row)
        if blank:
            scores[torch.tensor(blank)[:, None], torch.tensor(self.stop_ids)[None, :]] = float("-inf")
        return scores


class CaptionGenerator:
    """Turns [B, P, H] prefix vectors into B captions with one batched, KV-cached decode.

    This is the reference path (Hugging Face `generate()`); the tokenizer, the prompt
    embeddings and the weights are shared with the continuous engine, which reads them in
    its own layout (`lean`). A generator loaded with `lean=True` holds only that layout:
    the continuous engine serves it, `generate()` does not.
    """

    def __init__(self, spec: CaptionModelSpec, model, tokenizer) -> None:
        """Wrap a loaded causal LM (Hugging Face, or embcap.lean_llama's) and its tokenizer (see `load`)."""
        self.spec = spec
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = model.device
        self.dtype = model.dtype
        self.hidden_size = int(self.model.config.hidden_size)
        self.stop_ids = stop_token_ids(self.tokenizer, spec)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.stop_ids[0]
        ids = prompt_ids(self.tokenizer, spec)
        slots = spec.prompt.prefix_slots
        self.prefix_slots = None if slots is None else torch.tensor(slots, dtype=torch.long)
        embed = self.model.get_input_embeddings()
        with torch.no_grad():
            self.prompt_start = embed(torch.tensor([ids.before], dtype=torch.long, device=self.device))
            self.prompt_end = embed(torch.tensor([ids.after], dtype=torch.long, device=self.device))

    @classmethod
    def load(
        cls,
        spec: CaptionModelSpec,
        decoder_dir: str | Path,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        lean: bool = False,
        log=lambda _: None,
    ) -> "CaptionGenerator":
        """Load the Hugging Face decoder folder onto `device` in `dtype`, straight from its files (no CPU copy
        first). With `lean`, only the continuous engine's layout is built (no Hugging Face model)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(decoder_dir)
        if lean:
            from embcap.lean_llama import LeanLlama

            model = LeanLlama.from_pretrained(decoder_dir, device, dtype, log)
        else:
            model = AutoModelForCausalLM.from_pretrained(decoder_dir, dtype=dtype, device_map=torch.device(device))
        return cls(spec, model, tokenizer)

    @cached_property
    def lean(self) -> "LeanLlama":
        """The weights in the continuous engine's layout (the model itself when it was loaded lean)."""
        from embcap.lean_llama import LeanLlama

        return self.model if isinstance(self.model, LeanLlama) else LeanLlama.from_hf(self.model)

    @property
    def prompt_length(self) -> int:
        """Positions in the prompt, the prefix vectors' included (P, or one per `prompt.prefix_slots` entry)."""
        slots = self.spec.prefix_length if self.prefix_slots is None else len(self.prefix_slots)
        return self.prompt_start.shape[1] + slots + self.prompt_end.shape[1]

    def prompt_embeddings(self, prefix: torch.Tensor) -> torch.Tensor:
        """[B, P, H] prefix -> [B, L, H] prompt embeddings (every row has the same length)."""
        batch = prefix.shape[0]
        prefix = prefix.to(device=self.device, dtype=self.dtype)
        if self.prefix_slots is not None:
            prefix = prefix[:, self.prefix_slots.to(self.device)]
        return torch.cat(
            [self.prompt_start.expand(batch, -1, -1), prefix, self.prompt_end.expand(batch, -1, -1)], dim=1
        )

    def decode(self, tokens: list[int]) -> str:
        """Caption text of generated token ids (special tokens dropped, whitespace stripped)."""
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def check_prefix(self, prefix: np.ndarray | torch.Tensor) -> torch.Tensor:
        tensor = torch.as_tensor(prefix)
        expected = (self.spec.prefix_length, self.hidden_size)
        if tensor.ndim != 3 or tuple(tensor.shape[1:]) != expected:
            raise ValueError(f"prefix must have shape [B, {expected[0]}, {expected[1]}], got {list(tensor.shape)}")
        return tensor

    def generate(self, prefix: np.ndarray | torch.Tensor) -> list[str]:
        """Generate one caption per row of `prefix` (never blank: see BlankGuard and BLANK_FALLBACK)."""
        return self.generate_counting_fallbacks(prefix)[0]

    @torch.inference_mode()
    def generate_counting_fallbacks(self, prefix: np.ndarray | torch.Tensor,
                                    plan: "CandidatePlan | None" = None) -> tuple[list[str], int]:
        """`generate()`, plus how many rows stayed blank up to max_new_tokens and got BLANK_FALLBACK.

        With a `plan` of C candidates per row (embcap.candidates) the answer holds rows x C captions,
        row by row: the greedy candidates from one greedy call, the sampled ones from one sampled call
        with C' return sequences per row, seeded with the plan's seed (reproducible for the same batch).
        """
        prefix = self.check_prefix(prefix)
        if prefix.shape[0] == 0:
            return [], 0
        embeds = self.prompt_embeddings(prefix)
        settings = self.spec.generation
        if plan is None or plan.count == 1:
            sampling = {"do_sample": False}
            if settings.do_sample:
                sampling = {"do_sample": True, "temperature": settings.temperature, "top_k": settings.top_k}
            texts = self._generate(embeds, **sampling)
        else:
            texts = self._candidates(embeds, plan)
        blank = sum(not is_visible(text) for text in texts)
        return [text if is_visible(text) else BLANK_FALLBACK for text in texts], blank

    def _candidates(self, embeds: torch.Tensor, plan: "CandidatePlan") -> list[str]:
        rows, count = embeds.shape[0], plan.count
        greedy = [index for index in range(count) if plan.greedy[index]]
        sampled = [index for index in range(count) if not plan.greedy[index]]
        texts: list[str] = [""] * (rows * count)
        if greedy:
            captions = self._generate(embeds, do_sample=False)
            for row in range(rows):
                for index in greedy:
                    texts[row * count + index] = captions[row]
        if sampled:
            torch.manual_seed(plan.sampling.seed)
            captions = self._generate(embeds, do_sample=True, temperature=plan.sampling.temperature,
                                      top_k=plan.sampling.top_k, top_p=plan.sampling.top_p,
                                      num_return_sequences=len(sampled))
            for row in range(rows):  # generate() returns each row's sequences together
                for order, index in enumerate(sampled):
                    texts[row * count + index] = captions[row * len(sampled) + order]
        return texts

    def _generate(self, embeds: torch.Tensor, **sampling) -> list[str]:
        """One `generate()` call over [B, L, H] prompt embeddings; the decoded, stripped texts."""
        if not hasattr(self.model, "generate"):
            raise TypeError("this generator holds the continuous engine's weights only (loaded lean): "
                            "generate() needs the Hugging Face model")
        settings = self.spec.generation
        tokens = self.model.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device),
            max_new_tokens=settings.max_new_tokens,
            min_new_tokens=settings.min_new_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            use_cache=True,
            logits_processor=[BlankGuard(self.decode, self.stop_ids)],
            **sampling,
        )
        return [text.strip() for text in self.tokenizer.batch_decode(tokens, skip_special_tokens=True)]
