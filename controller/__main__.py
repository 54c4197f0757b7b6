"""`python -m controller` / `fleet controller`."""

from __future__ import annotations

from collections.abc import Sequence

import uvicorn

from controller.app import create_app
from controller.settings import ControllerSettings
from fleet.logs import setup_logging


def main(argv: Sequence[str] | None = None) -> int:
    settings = ControllerSettings.from_cli(argv)
    setup_logging(settings.log_level, "controller")
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port,
        log_level=settings.log_level, access_log=False,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
