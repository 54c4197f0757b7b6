"""Keeping the routing table in step with the controllers' snapshot.

The gateway asks for `/snapshot` every `interval` seconds, from the first controller that
answers, starting with the last one that did. While none answers the table keeps routing on the
last snapshot and is marked stale (`/health`, `fleet_gateway_table_stale`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence

import aiohttp

from controller.protocol import Snapshot
from gateway.routing_table import RoutingTable

logger = logging.getLogger(__name__)

_TIMEOUT = aiohttp.ClientTimeout(total=2.0)


class ControllerSync:
    """Polls the controllers for `table`, over the process's one aiohttp session.

    `headers` carry the token that lets the gateway read the snapshot."""

    def __init__(self, table: RoutingTable, session: aiohttp.ClientSession,
                 controllers: Sequence[str], *, interval: float,
                 headers: Mapping[str, str] | None = None) -> None:
        if not controllers:
            raise ValueError("at least one controller address is needed")
        self._table = table
        self._session = session
        self.controllers = [c.rstrip("/") for c in controllers]
        self._interval = interval
        self._headers = dict(headers or {})
        self._current = 0

    async def sync_once(self, controller: str) -> None:
        """Fetch one controller's snapshot into the table; raises if it does not give one."""
        async with self._session.get(f"{controller}/snapshot", timeout=_TIMEOUT,
                                     headers=self._headers) as response:
            response.raise_for_status()
            self._table.update(Snapshot.model_validate_json(await response.read()))

    async def sync_round(self) -> bool:
        """Try each controller once, the last good one first; False if none answered."""
        table, controllers = self._table, self.controllers
        for attempt in range(len(controllers)):
            index = (self._current + attempt) % len(controllers)
            try:
                await self.sync_once(controllers[index])
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                refused = isinstance(exc, aiohttp.ClientResponseError) and \
                    exc.status in (401, 403)
                if refused and not table.stale:
                    logger.error("controller refused the gateway's token address=%s: set "
                                 "FLEET_READ_TOKEN or FLEET_CLUSTER_TOKEN error=%r",
                                 controllers[index], exc)
                elif not table.stale:
                    logger.warning("controller sync failed address=%s error=%r",
                                   controllers[index], exc)
                continue
            if index != self._current:
                logger.info("syncing from controller address=%s", controllers[index])
            self._current = index
            return True
        if not table.stale:
            logger.warning("no controller answers; routing on the last table")
        table.mark_stale()
        return False

    async def run_forever(self) -> None:
        while True:
            await self.sync_round()
            await asyncio.sleep(self._interval)
