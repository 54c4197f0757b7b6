"""`python -m webui` / `fleet webui`."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from fleetcore.logs import setup_logging
from webui.settings import WebUISettings


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = WebUISettings.from_cli(argv)
    except ValidationError as exc:
        print(f"fleet webui: invalid settings: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, "webui")
    # Before Gradio is imported: no telemetry or update checks from a machine that serves models.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import uvicorn

    from webui.app import create_server

    print(f"llm-fleet web UI on {settings.scheme}://{settings.host}:{settings.port} "
          f"(gateway {settings.gateway_url})", flush=True)
    # Open browser tabs hold a stream each: bound the wait for them on SIGTERM.
    uvicorn.run(create_server(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level, access_log=False, timeout_graceful_shutdown=5,
                **settings.uvicorn_ssl())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
