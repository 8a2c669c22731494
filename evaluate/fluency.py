"""Degenerate captions: what a generator trained against a similarity score may learn to write instead of text.

A caption counts as degenerate when it is empty after stripping (or is the blank fallback that serving
answers instead of an empty caption), when it repeats words back to back ("the the", "in the snow in the
snow": an n-gram of 1 to 4 words immediately repeated), or when it ran into the token limit without ending.
`fluency` gives the share of each and of any, and the mean length in words, so a reward run can be
checked against the model it started from.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from embcap.generation import BLANK_FALLBACK

MAX_REPEATED_NGRAM = 4  # longest word n-gram whose immediate repetition counts as degenerate
_WORD = re.compile(r"[\w']+")


def words(text: str) -> list[str]:
    """Lower-cased words of `text`, punctuation dropped."""
    return _WORD.findall(text.lower())


def is_empty(text: str) -> bool:
    """Nothing left after stripping, or the fallback serving answers for a caption that stayed blank."""
    return not text.strip() or text.strip() == BLANK_FALLBACK


def repeats_words(text: str, longest: int = MAX_REPEATED_NGRAM) -> bool:
    """True when some n-gram of 1..`longest` words is immediately followed by itself."""
    tokens = words(text)
    for size in range(1, longest + 1):
        for start in range(len(tokens) - 2 * size + 1):
            if tokens[start:start + size] == tokens[start + size:start + 2 * size]:
                return True
    return False


@dataclass
class Fluency:
    """Shares of `captions` that are empty, repeat words, hit the token limit, or any of these; mean words."""

    captions: int
    empty: float
    repeated_words: float
    over_token_limit: float | None  # None when no tokenizer was given
    degenerate: float
    mean_words: float

    def record(self) -> dict:
        """JSON-ready, rounded."""
        return {key: (round(value, 4) if isinstance(value, float) else value) for key, value in asdict(self).items()}


def fluency(captions: Sequence[str], count_tokens: Callable[[str], int] | None = None,
            max_tokens: int | None = None) -> Fluency:
    """The degenerate shares of `captions`; with `count_tokens` and `max_tokens` (the generation limit), a caption
    of at least `max_tokens` tokens counts as one that ran into the limit."""
    if not captions:
        return Fluency(0, 0.0, 0.0, None if count_tokens is None else 0.0, 0.0, 0.0)
    empty = [is_empty(text) for text in captions]
    repeated = [repeats_words(text) for text in captions]
    limited = ([count_tokens(text) >= max_tokens for text in captions]
               if count_tokens is not None and max_tokens is not None else [False] * len(captions))
    bad = [a or b or c for a, b, c in zip(empty, repeated, limited)]
    count = len(captions)
    return Fluency(count, sum(empty) / count, sum(repeated) / count,
                   sum(limited) / count if count_tokens is not None and max_tokens is not None else None,
                   sum(bad) / count, sum(len(words(text)) for text in captions) / count)


def token_counter(tokenizer) -> Callable[[str], int]:
    """Tokens of a caption as the decoder wrote it (after the prompt, so with a leading space)."""
    return lambda text: len(tokenizer(" " + text, add_special_tokens=False)["input_ids"])


__all__ = ["Fluency", "MAX_REPEATED_NGRAM", "fluency", "is_empty", "repeats_words", "token_counter", "words"]
