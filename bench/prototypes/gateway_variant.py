"""Prototype: the gateway without a readiness round trip on the request path.

gateway/app.py checks readiness before every inference (cached 0.25 s): with
multi-second captions every request pays `is_server_ready` + `is_model_ready`, two
gRPC round trips, before its inference call. Triton's own answer to the inference
call already tells "not ready" (UNAVAILABLE -> 503), so once the model has been
seen ready the check can be skipped; it is still made before the first success
and after a failure.

    python -m bench.prototypes.gateway_variant --triton-url 127.0.0.1:8001 --port 8100 --variant {always,skip}

`always` forces the check on every request (the real model's case, where requests
take longer than the cache), `skip` is the proposal.
"""

from __future__ import annotations

import argparse
import logging


def patch_skip() -> None:
    """Readiness.wait returns at once while the last known state is ready."""
    from gateway import app as gateway_app

    original_wait = gateway_app.Readiness.wait

    async def wait(self, timeout_s: float):
        if self._state[0] and not (self.status_source and self.status_source()):
            return self._state
        return await original_wait(self, timeout_s)

    gateway_app.Readiness.wait = wait


def patch_always() -> None:
    from gateway import app as gateway_app

    original_init = gateway_app.Readiness.__init__

    def init(self, captioner, status_source, ttl_s: float = 0.0):
        original_init(self, captioner, status_source, ttl_s=0.0)

    gateway_app.Readiness.__init__ = init


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from gateway.app import create_app
    from gateway.settings import GatewaySettings

    parser = argparse.ArgumentParser(prog="python -m bench.prototypes.gateway_variant", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triton-url", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--variant", choices=("always", "skip"), required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    (patch_always if args.variant == "always" else patch_skip)()
    app = create_app(GatewaySettings.from_env(triton_url=args.triton_url))
    uvicorn.run(app, host="127.0.0.1", port=args.port, access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
