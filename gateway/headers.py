"""What the gateway takes from a request's headers: its id (validated, else replaced) and the body's type.

Nothing a client sends in a header is echoed unchecked: a request id that is too long or
holds other characters than REQUEST_ID allows is replaced by a fresh one (the answer's
`X-Request-ID` says which), and refusals quote header values cut to a few dozen characters.
"""

from __future__ import annotations

import re
import uuid
from typing import Mapping

from gateway.protocol import RequestError

REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")  # UUIDs, hex ids, trace ids; nothing else is echoed
# curl -d sends form-urlencoded by default; the body is still read as JSON.
ACCEPTED_CONTENT_TYPES = ("application/json", "application/x-www-form-urlencoded", "text/json")
QUOTED_CHARS = 40  # of a header value named in a refusal


def quoted(value: str) -> str:
    """`value` for an error message: cut to QUOTED_CHARS, repr-quoted."""
    return repr(value if len(value) <= QUOTED_CHARS else value[:QUOTED_CHARS] + "...")


def request_id(headers: Mapping[str, str]) -> tuple[str, bool]:
    """(the request's id, whether the client's was refused and replaced)."""
    given = headers.get("x-request-id")
    if given and REQUEST_ID.fullmatch(given):
        return given, False
    return uuid.uuid4().hex, given is not None


def check_body_headers(headers: Mapping[str, str]) -> None:
    """415 unless the body is plain UTF-8 JSON: a JSON media type, charset utf-8 if any, no content encoding."""
    encoding = headers.get("content-encoding", "").strip().lower()
    if encoding and encoding != "identity":
        raise RequestError(415, "unsupported_content_encoding",
                           f"content encoding {quoted(encoding)} is not accepted: send the JSON body uncompressed")
    content_type = headers.get("content-type")
    if content_type is None:
        return
    media, *parameters = (part.strip() for part in content_type.split(";"))
    media = media.lower()
    if media not in ACCEPTED_CONTENT_TYPES and not media.endswith("+json"):
        raise RequestError(415, "unsupported_media_type", f"content type {quoted(media)} is not JSON; "
                                                          "send application/json")
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        charset = value.strip().strip('"').lower()
        if name.strip().lower() == "charset" and charset not in ("utf-8", "utf8"):
            raise RequestError(415, "unsupported_charset",
                               f"charset {quoted(charset)} is not accepted: the body must be UTF-8 JSON")
