"""`python -m controller` / `fleet controller`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import uvicorn
from pydantic import ValidationError

from controller.app import create_app
from controller.settings import ControllerSettings
from fleetcore.logs import setup_logging


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = ControllerSettings.from_cli(argv)
    except ValidationError as exc:
        print(f"fleet controller: invalid settings: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, "controller")
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port,
        log_level=settings.log_level, access_log=False, **settings.uvicorn_ssl(),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
