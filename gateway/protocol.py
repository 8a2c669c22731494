"""The request protocol: parse and validate an evaluator request, encode the answer, check its count.

Parsing runs in two steps so that what does not depend on the served model (JSON, field
names, number types) is refused at once, and the rest (row width, row count, float32
range) once the served model's width is known: `decode_values`, then `to_rows`.
`parse_embeddings` is both. The gateway (gateway/app.py) is the HTTP layer over these.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import orjson

from embcap.contract import EMBEDDING_DIM

DEFAULT_MAX_ROWS = 256  # embeddings per request (gateway setting EMBCAP_MAX_ROWS)
FLOAT32_MAX = float(np.finfo(np.float32).max)
SHOWN_FIELDS = 5  # unknown field names a refusal lists, each cut to SHOWN_CHARS
SHOWN_CHARS = 40
# A body above this is scanned before it is parsed: a parse holds the interpreter's lock for its whole
# length (~0.1 s per 15 MB), so what a C-speed scan can refuse is never parsed.
PRESCAN_BYTES = 1 << 20
NUMBER_BYTES = b"0123456789+-.eE,[]{}: \t\r\n"  # all a valid body holds besides its one key
KEY = b'"embedding"'
KEY_REST = KEY.translate(None, NUMBER_BYTES)  # what the scan leaves of a valid body (the key less its e's)
# What deleting the bytes of numbers, commas and whitespace leaves of a body that holds its one key and a flat
# list of numbers only: any string, true/false/null, nested list or object, or second key leaves more.
FLAT_REST = b"{" + KEY.translate(None, NUMBER_BYTES) + b":[]}"
FLAT_BYTES = NUMBER_BYTES.translate(None, b"[]{}:")


class RequestError(Exception):
    """A client error: `status` is the HTTP status, `code` a short machine-readable name."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class BackendError(RequestError):
    """Triton could not answer: unreachable (503), too slow (504) or failed (502)."""


@dataclass(frozen=True)
class Limits:
    """What a request may hold."""

    max_rows: int = DEFAULT_MAX_ROWS
    embedding_dim: int = EMBEDDING_DIM


def _invalid(message: str, code: str = "invalid_embedding") -> RequestError:
    return RequestError(422, code, message)


def _shown(name: str) -> str:
    return repr(name if len(name) <= SHOWN_CHARS else name[:SHOWN_CHARS] + "...")


def _load_json(body: bytes) -> object:
    """One strict parse (orjson: UTF-8 only, no NaN/Infinity); a refusal names what orjson stopped at."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        at = exc.pos
        for constant in (b"NaN", b"Infinity", b"-Infinity"):
            start = at - 1 if constant.startswith(b"-") else at
            if body[start:start + len(constant)] == constant:
                raise _invalid(f"embedding contains {constant.decode()}: only finite numbers are allowed") from None
        if "infinity when parsed as double" in exc.msg:  # 1e400, or an integer of 400 digits
            raise _invalid("'embedding' holds a number too large for a float (beyond float64): not a finite "
                           "float32") from None
        raise RequestError(400, "invalid_json", f"body is not valid JSON (UTF-8, no byte-order mark): "
                                                f"{exc.msg} at byte {at}") from None


_NUMBER_TYPES = {float, int}  # exact types: bool, a subclass of int, is not a number here


def _first_non_number(values: list) -> int | None:
    for index, value in enumerate(values):
        kind = type(value)
        if kind is not float and kind is not int:  # bool is a subclass of int: excluded by `is`
            return index
    return None


def _prescan(body: bytes, limits: Limits | None) -> None:
    """Refuse a large body without parsing it when a scan tells: a byte no number holds, too many numbers."""
    rest = body.translate(None, NUMBER_BYTES)
    if rest != KEY_REST:
        start = body.find(KEY) + len(KEY) if KEY in body else 0
        for constant in (b"NaN", b"-Infinity", b"Infinity"):
            if constant in rest and constant in body[start:]:
                raise _invalid(f"embedding contains {constant.decode()} (at byte {body.index(constant, start)}): "
                               "only finite numbers are allowed")
        return  # anything else: the parse names it exactly
    numbers = body.count(b",") + 1
    if limits is not None and numbers > limits.max_rows * limits.embedding_dim:
        raise _invalid(f"batch of about {numbers // limits.embedding_dim} rows exceeds the limit of "
                       f"{limits.max_rows}", "batch_too_large")


def decode_values(body: bytes, limits: Limits | None = None) -> list:
    """The request's flat list of numbers, or RequestError naming what is wrong with the body. `limits`
    (when the served width is known) lets a large body with too many rows be refused before it is parsed."""
    if not body:
        raise RequestError(400, "empty_body", "request body is empty; expected {\"embedding\": [...]}")
    if len(body) > PRESCAN_BYTES:
        _prescan(body, limits)
    payload = _load_json(body)
    if not isinstance(payload, dict):
        raise _invalid(f"body must be a JSON object, got {type(payload).__name__}", "invalid_request")
    if "embedding" not in payload:
        raise _invalid("missing field 'embedding'", "invalid_request")
    if len(payload) > 1:
        extra = [key for key in payload if key != "embedding"]
        shown = ", ".join(map(_shown, heapq.nsmallest(SHOWN_FIELDS, extra)))
        more = f" and {len(extra) - SHOWN_FIELDS} more" if len(extra) > SHOWN_FIELDS else ""
        raise _invalid(f"unknown field(s) {shown}{more}; only 'embedding' is accepted", "invalid_request")
    values = payload["embedding"]
    if not isinstance(values, list):
        raise _invalid(f"'embedding' must be a flat list of numbers, got {type(values).__name__}")
    if not values:
        raise _invalid("'embedding' is empty")
    if body.translate(None, FLAT_BYTES) == FLAT_REST:  # one key, numbers only: the two checks below hold
        return values
    if not set(map(type, values)) <= _NUMBER_TYPES:  # C-speed check; the slow scan only names the culprit
        bad = _first_non_number(values)
        raise _invalid(f"'embedding'[{bad}] is {type(values[bad]).__name__}, not a number (the list must be flat)")
    if body.count(b'"') != 2:  # a valid body holds one string, its key: any other was a duplicate key
        raise _invalid("the body names 'embedding' more than once: send it once", "duplicate_key")
    return values


def to_rows(values: list, limits: Limits = Limits()) -> np.ndarray:
    """`decode_values`' list as a float32 [rows, dim] array, or RequestError naming the problem."""
    dim = limits.embedding_dim
    if len(values) % dim:
        raise _invalid(f"'embedding' has {len(values)} numbers, not a multiple of {dim}")
    rows = len(values) // dim
    if rows > limits.max_rows:
        raise _invalid(f"batch of {rows} rows exceeds the limit of {limits.max_rows}", "batch_too_large")
    try:
        wide = np.fromiter(values, dtype=np.float64, count=len(values))  # decode_values checked the types
    except OverflowError:  # an integer beyond float64
        raise _invalid("'embedding' holds an integer too large for a float") from None
    finite = np.isfinite(wide) & (np.abs(wide) <= FLOAT32_MAX)
    if not finite.all():
        index = int(np.argmin(finite))
        raise _invalid(f"'embedding'[{index}] = {values[index]!r} is not a finite float32")
    return wide.astype(np.float32).reshape(rows, dim)


def parse_embeddings(body: bytes, limits: Limits = Limits()) -> np.ndarray:
    """Turn a request body into a float32 [rows, dim] array, or raise RequestError naming the problem
    (`decode_values`, then `to_rows`, in one call: the gateway's one trip to its parse thread)."""
    return to_rows(decode_values(body, limits), limits)


def encode_texts(texts: list[str]) -> bytes:
    """The response body for a list of captions."""
    return orjson.dumps({"texts": texts})


def check_count(texts: list[str], rows: int) -> list[str]:
    """The model must answer one caption per row; anything else is a server fault."""
    if len(texts) != rows:
        raise BackendError(502, "count_mismatch", f"model returned {len(texts)} captions for {rows} rows")
    return texts


class Captioner(Protocol):
    """What answers captions (gateway.triton_client.TritonCaptioner)."""

    async def caption(self, embeddings: np.ndarray, request_id: str = "") -> list[str]: ...


async def caption_embeddings(embeddings: np.ndarray, captioner: Captioner, request_id: str = "") -> list[str]:
    """One caption per embedding row, in order, from Triton; a wrong count is a BackendError."""
    texts = await captioner.caption(embeddings, request_id=request_id)
    return check_count(texts, len(embeddings))

