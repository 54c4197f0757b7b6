"""`python -m gateway` / `fleet gateway`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import uvicorn
from pydantic import ValidationError

from fleetcore.logs import setup_logging
from gateway.app import create_app
from gateway.keys import KeysFileError
from gateway.settings import GatewaySettings


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = GatewaySettings.from_cli(argv)
        setup_logging(settings.log_level, "gateway")
        app = create_app(settings)
    except (ValidationError, OSError, KeysFileError) as exc:
        print(f"fleet gateway: invalid settings: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                access_log=False, **settings.uvicorn_ssl())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
