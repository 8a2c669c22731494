"""How long one request may take, end to end: the gateway's Triton deadline and the decoder's are one value.

The gateway stops waiting for Triton after this long (and answers 504); the continuous
engine drops a request's rows once it has been decoding for this long, so an abandoned
request stops costing decode steps. Triton's ensemble does not pass a client's
cancellation on to the request its decoder step is serving, hence the deadline.
"""

from __future__ import annotations

import os

REQUEST_TIMEOUT_ENV = "EMBCAP_REQUEST_TIMEOUT_S"
DEFAULT_REQUEST_TIMEOUT_S = 55.0  # the evaluator gives up at 60 s


def request_timeout_s() -> float:
    """$EMBCAP_REQUEST_TIMEOUT_S, else the default."""
    return float(os.environ.get(REQUEST_TIMEOUT_ENV, DEFAULT_REQUEST_TIMEOUT_S))
