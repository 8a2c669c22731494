"""Stacking the requests of one dynamic batch, and cutting the result back apart."""

from __future__ import annotations

from typing import Sequence, TypeVar

T = TypeVar("T")


def split_rows(stacked: Sequence[T], sizes: Sequence[int]) -> list[Sequence[T]]:
    """Cut `stacked` into consecutive pieces of `sizes` rows, one per request, in order."""
    if sum(sizes) != len(stacked):
        raise ValueError(f"{len(stacked)} rows cannot be split into {list(sizes)}")
    pieces, start = [], 0
    for size in sizes:
        pieces.append(stacked[start:start + size])
        start += size
    return pieces
