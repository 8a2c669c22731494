"""Request validation, the one table: every malformed body gets its status and a detail naming the problem
(gateway.protocol.parse_embeddings; the media-type checks are tests/test_gateway_parts.py's). The live
gateway's answer to them is tests/test_bad_input.py's smoke test."""

import json

import numpy as np
import pytest

from gateway.protocol import Limits, RequestError, parse_embeddings
from embcap.inputs import realistic_embeddings

ROW = realistic_embeddings(1, seed=10)[0].tolist()  # evaluator-like: a mean of 15 unit vectors, norm < 1


def as_json(obj) -> bytes:
    return json.dumps(obj).encode()


def raw_number(text: str) -> bytes:
    return b'{"embedding": [' + b"0.5, " * 1023 + text.encode() + b"]}"


# (case, body, status, fragment of the detail)
CASES = [
    ("empty body", b"", 400, "empty"),
    ("not JSON", b"hello", 400, "not valid JSON"),
    ("truncated JSON", b'{"embedding": [1, 2', 400, "not valid JSON"),
    ("invalid UTF-8", b'{"embedding": ["\xff\xfe"]}', 400, "not valid JSON"),
    ("deeply nested", b"[" * 100_000 + b"]" * 100_000, 400, "not valid JSON"),
    ("JSON array", as_json([ROW]), 422, "JSON object"),
    ("JSON string", as_json("embedding"), 422, "JSON object"),
    ("JSON null", b"null", 422, "JSON object"),
    ("JSON number", b"42", 422, "JSON object"),
    ("no fields", as_json({}), 422, "missing field 'embedding'"),
    ("wrong field name", as_json({"embeddings": ROW}), 422, "missing field 'embedding'"),
    ("extra field", as_json({"embedding": ROW, "model": "x"}), 422, "unknown field(s) 'model'"),
    ("embedding is a string", as_json({"embedding": "0.1,0.2"}), 422, "flat list"),
    ("embedding is a number", as_json({"embedding": 0.5}), 422, "flat list"),
    ("embedding is an object", as_json({"embedding": {"a": 1}}), 422, "flat list"),
    ("embedding is null", as_json({"embedding": None}), 422, "flat list"),
    ("empty list", as_json({"embedding": []}), 422, "is empty"),
    ("1000 numbers", as_json({"embedding": ROW[:1000]}), 422, "not a multiple of 1024"),
    ("1023 numbers", as_json({"embedding": ROW[:-1]}), 422, "1023 numbers, not a multiple of 1024"),
    ("1025 numbers", as_json({"embedding": ROW + [0.1]}), 422, "not a multiple of 1024"),
    ("NaN", raw_number("NaN"), 422, "NaN"),
    ("Infinity", raw_number("Infinity"), 422, "Infinity"),
    ("-Infinity", raw_number("-Infinity"), 422, "Infinity"),
    ("string element", as_json({"embedding": ROW[:-1] + ["0.5"]}), 422, "[1023] is str"),
    ("null element", as_json({"embedding": [None] + ROW[1:]}), 422, "[0] is NoneType"),
    ("bool element", as_json({"embedding": [False] + ROW[1:]}), 422, "[0] is bool"),
    ("nested lists", as_json({"embedding": [ROW, ROW]}), 422, "[0] is list"),
    ("beyond float32", raw_number("1e39"), 422, "[1023] = 1e+39 is not a finite float32"),
    ("beyond float64", raw_number("1e400"), 422, "not a finite float32"),
    ("huge integer", raw_number("1" + "0" * 400), 422, "too large"),
    ("batch above the limit", as_json({"embedding": ROW * 3}), 422, "3 rows exceeds the limit of 2"),
]


@pytest.mark.parametrize("rows", [1, 4, 33])
def test_valid_batches_are_reshaped_in_order(rows):
    values = np.arange(rows * 1024, dtype=np.float32) / 1000
    array = parse_embeddings(as_json({"embedding": values.tolist()}))
    assert array.shape == (rows, 1024) and array.dtype == np.float32
    assert np.array_equal(array.reshape(-1), values)


def test_integers_are_numbers():
    assert parse_embeddings(as_json({"embedding": [1] * 1024}))[0, 0] == 1.0


@pytest.mark.parametrize(("case", "raw", "status", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_bad_requests_name_the_problem(case, raw, status, fragment):
    with pytest.raises(RequestError) as caught:
        parse_embeddings(raw, Limits(max_rows=2))
    assert caught.value.status == status
    assert fragment in caught.value.message
    assert len(caught.value.message) < 400  # bounded, whatever the body
