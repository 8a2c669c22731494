"""The evaluator's rule for splitting long text into pieces that a text encoder embeds one by one.

Its scorer splits a caption recursively on newline, ".", "!", "?", "," and space into pieces of at
most 74 tokens (greedily re-joining the parts along each delimiter) and averages the pieces'
embeddings. How tokens are counted and how a piece with no delimiter left is cut belong to the
encoder (`count`, `cut`): embcap.clip_bpe gives ImageBind's, embcap.candidate_encoders the others'.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

# The evaluator's split points, tried in this order (then a cut by token count).
SPLIT_DELIMITERS = ("\n", ".", "!", "?", ",", " ")


def split_by_token_limit(text: str, count: Callable[[str], int], cut: Callable[[str, int], list[str]],
                         max_tokens: int) -> list[str]:
    """The evaluator's splitting rule: pieces of at most `max_tokens` tokens (by `count`).

    Parts split at a delimiter are greedily re-joined while they fit; a piece that still does
    not fit is split at the next delimiter; with none left, `cut(piece, parts)` cuts its tokens
    into `max(1, tokens // max_tokens)` parts (the evaluator's cut, whose parts may exceed the
    limit: the model's context then truncates them, as it does for the evaluator).
    """

    def fits(segment: str) -> bool:
        return count(segment) <= max_tokens

    def split(segment: str, delimiters: tuple[str, ...]) -> list[str]:
        if fits(segment):
            return [segment]
        if not delimiters:
            return cut(segment, max(1, count(segment) // max_tokens))
        delimiter, joined, current = delimiters[0], [], ""
        for part in segment.split(delimiter):
            extended = current + (delimiter if current else "") + part
            if fits(extended):
                current = extended
            else:
                if current:
                    joined.append(current)
                current = part
        if current:
            joined.append(current)
        pieces: list[str] = []
        for piece in joined:
            pieces.extend([piece] if fits(piece) else split(piece, delimiters[1:]))
        return pieces

    return split(text, SPLIT_DELIMITERS)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row scaled to length 1 (float32)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def embed_in_pieces(texts: Sequence[str], pieces_of: Callable[[str], list[str]] | None,
                     embed: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """Embed each text, or each text's pieces in one call, averaging a text's pieces (then unit norm)."""
    if pieces_of is None:
        return unit_rows(embed(list(texts)))
    pieces = [pieces_of(text) or [text] for text in texts]
    flat = embed([piece for group in pieces for piece in group])
    means, start = [], 0
    for group in pieces:
        means.append(flat[start:start + len(group)].mean(axis=0))
        start += len(group)
    return unit_rows(np.stack(means))
