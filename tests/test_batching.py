"""Cutting a dynamic batch back into its requests."""

import pytest

from embcap.batching import split_rows


def test_pieces_follow_the_request_sizes_in_order():
    assert split_rows(list("abcdef"), [1, 3, 0, 2]) == [["a"], ["b", "c", "d"], [], ["e", "f"]]


def test_a_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="cannot be split"):
        split_rows([1, 2, 3], [1, 1])
