"""`python -m gateway` / `fleet gateway`."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, cast

import uvicorn
from pydantic import ValidationError
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from fleetcore.logs import setup_logging
from gateway.app import create_app
from gateway.asgi import GenerateRoutes
from gateway.keys import KeysFileError
from gateway.server import FleetHttpProtocol
from gateway.settings import GatewaySettings


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = GatewaySettings.from_cli(argv)
        setup_logging(settings.log_level, "gateway")
        app = create_app(settings)
    except (ValidationError, OSError, KeysFileError) as exc:
        print(f"fleet gateway: invalid settings: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=settings.log_level, access_log=False, proxy_headers=False,
                            http=FleetHttpProtocol, **settings.uvicorn_ssl())
    # The generation routes go first (gateway/asgi.py); the others get the proxy headers as
    # uvicorn would give them, from the addresses it trusts.
    # (uvicorn and Starlette type the same ASGI callables differently.)
    proxied: Any = ProxyHeadersMiddleware(cast(Any, app), trusted_hosts=config.forwarded_allow_ips)
    config.app = GenerateRoutes.ahead_of(app, proxied)
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 3  # as uvicorn.run: it could not start (a taken port)


if __name__ == "__main__":
    raise SystemExit(main())
