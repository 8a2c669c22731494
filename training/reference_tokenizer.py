"""The reference's A2A tokenizer: its token ids (with tiktoken, as it ran) and a Hugging Face copy for serving.

The A2A tokenizer is torchtune's Llama-3 tiktoken tokenizer with six marker tokens inserted
into the special-token list (training.reference_format). The prompt ids the reference fed its
model are computed here with tiktoken itself; the Hugging Face tokenizer written for serving is
converted from the same file by transformers' `TikTokenConverter`, and the importer checks that
serving tokenises the prompt to the very same ids.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from tokenizers import AddedToken
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from training.reference_format import (ASSISTANT, BEGIN_OF_TEXT, END_HEADER, END_OF_TEXT, EOT, MARKERS,
                                       PLACEHOLDERS, START_HEADER, TOKEN_PATTERN, USER, placeholder_text,
                                       special_token_ids)


class ReferenceFormatError(ValueError):
    """Something in the reference miner's files this importer does not understand."""


def read_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken BPE file (`base64-token rank` per line) -> token bytes -> rank, ranks 0..n-1.

    Read here rather than by tiktoken's loader, which caches by path name (a changed file at the
    same path would be read stale)."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as exc:
            raise ReferenceFormatError(f"{path}: line {number} is not `base64-token rank` ({exc})") from exc
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ReferenceFormatError(f"{path}: the {len(ranks)} ranks are not 0..{len(ranks) - 1} once each, "
                                   "so they cannot be token ids")
    missing = [byte for byte in range(256) if bytes([byte]) not in ranks]
    if missing:
        raise ReferenceFormatError(f"{path}: single bytes {missing[:8]} have no rank: not a byte-level BPE file")
    return ranks


class A2ATokenizer:
    """The reference's tokenizer over `ranks`: ids as torchtune's `TikTokenTokenizer` + A2A gave them."""

    def __init__(self, ranks: dict[bytes, int]) -> None:
        import tiktoken

        self.ranks = ranks
        self.special = special_token_ids(len(ranks))
        self.encoding = tiktoken.Encoding(name="a2a", pat_str=TOKEN_PATTERN, mergeable_ranks=ranks,
                                          special_tokens=self.special)

    def encode(self, text: str) -> list[int]:
        """A2A's encode: the markers are special tokens, every other special token's text is plain text.

        (torchtune also cuts texts over 400,000 characters and runs of 25,000 non-space characters
        before encoding; prompts never come near that.)"""
        return self.encoding.encode(text, allowed_special=set(MARKERS), disallowed_special=())

    def user_prompt(self, content: str) -> list[int]:
        """gen.py's prompt: a user turn holding `content`, an opened assistant turn, eot and eos stripped."""
        special = self.special
        ids = [special[BEGIN_OF_TEXT]]
        for role, text in ((USER, content), (ASSISTANT, "")):
            ids += [special[START_HEADER], *self.encode(role), special[END_HEADER], *self.encode("\n\n"),
                    *self.encode(text.strip()), special[EOT]]
        return (ids + [special[END_OF_TEXT]])[:-2]

    def media_prompt(self, template: str, perception_tokens: int) -> list[int]:
        """The token ids of `inference.prompt_template` with its placeholders filled as gen.py filled them."""
        content = template
        for placeholder, (start, end) in PLACEHOLDERS.items():
            content = content.replace(placeholder, start + placeholder_text(perception_tokens) + end)
        return self.user_prompt(content)


class _RanksConverter(TikTokenConverter):
    """transformers' TikTokenConverter fed ranks already read (see `read_ranks`)."""

    def __init__(self, ranks: dict[bytes, int]) -> None:
        super().__init__(vocab_file=None, pattern=TOKEN_PATTERN)
        self._ranks = ranks

    def load_tiktoken_bpe(self, tiktoken_url) -> dict[bytes, int]:
        return self._ranks


def serving_tokenizer(reference: A2ATokenizer):
    """A Hugging Face fast tokenizer with the reference's ids: BPE from the same ranks, the 256 special
    tokens at the same ids. The markers are added as ordinary (non-special) tokens so that a caption
    keeps them as text, as the reference's decode did; every other special token is special."""
    backend = _RanksConverter(reference.ranks).converted()
    for name, token_id in sorted(reference.special.items(), key=lambda item: item[1]):
        added = AddedToken(name, special=name not in MARKERS, normalized=False)
        (backend.add_tokens if name in MARKERS else backend.add_special_tokens)([added])
        if backend.token_to_id(name) != token_id:
            raise ReferenceFormatError(f"the converted tokenizer put {name} at {backend.token_to_id(name)}, "
                                       f"not at the reference's {token_id}")
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BEGIN_OF_TEXT, eos_token=END_OF_TEXT,
                                   clean_up_tokenization_spaces=False)
