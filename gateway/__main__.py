"""`python -m gateway`: run only the HTTP gateway against an already running Triton."""

from __future__ import annotations

import argparse
import uvicorn

from gateway.app import create_app
from gateway.logs import bound_foreign_loggers, configure_logging
from gateway.settings import GatewaySettings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m gateway", description=__doc__)
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--triton-url", default=None, help="Triton gRPC address (default $EMBCAP_TRITON_URL)")
    args = parser.parse_args(argv)
    configure_logging()
    settings = GatewaySettings.from_env(triton_url=args.triton_url)
    config = uvicorn.Config(create_app(settings), host=args.bind, port=args.port, access_log=False,
                            **settings.uvicorn_options())
    bound_foreign_loggers()
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
