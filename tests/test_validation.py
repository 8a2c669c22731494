"""Request parsing and validation (gateway.protocol.parse_embeddings)."""

import json

import numpy as np
import pytest

from gateway.protocol import Limits, RequestError, parse_embeddings

ROW = [0.5] * 1024


def body(obj) -> bytes:
    return json.dumps(obj).encode()


@pytest.mark.parametrize("rows", [1, 4, 33])
def test_valid_batches_are_reshaped_in_order(rows):
    values = np.arange(rows * 1024, dtype=np.float32) / 1000
    array = parse_embeddings(body({"embedding": values.tolist()}))
    assert array.shape == (rows, 1024) and array.dtype == np.float32
    assert np.array_equal(array.reshape(-1), values)


def test_integers_are_numbers():
    assert parse_embeddings(body({"embedding": [1] * 1024}))[0, 0] == 1.0


@pytest.mark.parametrize(
    ("raw", "status", "fragment"),
    [
        (b"", 400, "empty"),
        (b"{not json", 400, "not valid JSON"),
        (b'{"embedding": [NaN]}', 422, "NaN"),
        (b'{"embedding": [Infinity]}', 422, "Infinity"),
        (body([1, 2]), 422, "JSON object"),
        (body({"embeddings": ROW}), 422, "missing field 'embedding'"),
        (body({"embedding": ROW, "extra": 1}), 422, "unknown field"),
        (body({"embedding": "1,2"}), 422, "flat list"),
        (body({"embedding": []}), 422, "empty"),
        (body({"embedding": ROW[:-1]}), 422, "1023 numbers, not a multiple of 1024"),
        (body({"embedding": ROW[:-1] + ["1.0"]}), 422, "[1023] is str"),
        (body({"embedding": [None] + ROW[1:]}), 422, "[0] is NoneType"),
        (body({"embedding": [True] + ROW[1:]}), 422, "[0] is bool"),
        (body({"embedding": [ROW]}), 422, "[0] is list"),
        (body({"embedding": ROW[:-1] + [1e39]}), 422, "[1023] = 1e+39 is not a finite float32"),
        (body({"embedding": ROW[:-1] + [10**400]}), 422, "too large"),
        (body({"embedding": ROW * 3}), 422, "3 rows exceeds the limit of 2"),
    ],
)
def test_bad_requests_name_the_problem(raw, status, fragment):
    with pytest.raises(RequestError) as caught:
        parse_embeddings(raw, Limits(max_rows=2))
    assert caught.value.status == status
    assert fragment in caught.value.message
