"""The request logic, at the place the evaluator's repository layout names: `inference.py`.

A request's path: gateway/app.py (HTTP) -> gateway/protocol.py (parse and validate the
body, check the caption count; re-exported here) -> gateway/triton_client.py (one gRPC
call to Triton's `captioner` ensemble) -> the projector and decoder models under
model_repository/, which run embcap's model code. Use this module to parse or caption
evaluator requests from a script:

    from inference import parse_embeddings
    rows = parse_embeddings(b'{"embedding": [...]}')  # float32 [rows, 1024], or RequestError
"""

from gateway.protocol import (
    BackendError,
    Limits,
    RequestError,
    caption_embeddings,
    check_count,
    decode_values,
    encode_texts,
    parse_embeddings,
    to_rows,
)

__all__ = ["BackendError", "Limits", "RequestError", "caption_embeddings", "check_count", "decode_values",
           "encode_texts", "parse_embeddings", "to_rows"]
