"""`python -m worker` / `fleet worker`."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from fleetcore.logs import setup_logging
from worker.service import Worker
from worker.settings import WorkerSettings


async def _run(settings: WorkerSettings) -> int:
    worker = Worker(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.request_stop)
    return await worker.run()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = WorkerSettings.from_cli(argv)
    except ValidationError as exc:
        print(f"fleet worker: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, "worker")
    try:
        return asyncio.run(_run(settings))
    except FileNotFoundError as exc:
        print(f"fleet worker: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
