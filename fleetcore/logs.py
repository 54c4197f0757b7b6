"""Logging set-up shared by every service: one format, key=value messages."""

from __future__ import annotations

import logging


def setup_logging(level: str = "INFO", name: str = "") -> None:
    prefix = f"{name} " if name else ""
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s",
    )
    # httpx logs every request at INFO; that is noise next to heartbeats.
    logging.getLogger("httpx").setLevel(logging.WARNING)
