"""Keeping the routing table in step with the controllers' table.

The gateway asks for `/table?since=REV` every `interval` seconds, from the first controller that
answers, starting with the last one that did: the changes since the revision it holds, or the
whole table on first contact, after a switch of controller or a controller's restart. A
controller from before `/table` (404) is read by `/snapshot`. While none answers the table keeps
routing on the last snapshot and is marked stale (`/health`, `fleet_gateway_table_stale`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence

import aiohttp

from controller.protocol import Snapshot, TableChanges, WorkerRecord
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
        # What the last read gave: its controller, epoch and revision, and the workers.
        self._source: tuple[str, str, int] | None = None
        self._workers: dict[str, WorkerRecord] = {}
        self._legacy: set[str] = set()  # controllers without /table

    async def sync_once(self, controller: str) -> None:
        """Read one controller's table (or its changes) into the routing table; raises if it
        does not give one."""
        if controller in self._legacy:
            await self._read_snapshot(controller)
            return
        params = {}
        if self._source is not None and self._source[0] == controller:
            params = {"since": str(self._source[2]), "epoch": self._source[1]}
        async with self._session.get(f"{controller}/table", params=params, timeout=_TIMEOUT,
                                     headers=self._headers) as response:
            if response.status == 404:
                logger.info("controller has no /table; reading /snapshot address=%s",
                            controller)
                self._legacy.add(controller)
                self._source = None
                await self._read_snapshot(controller)
                return
            response.raise_for_status()
            changes = TableChanges.model_validate_json(await response.read())
        self._table.update(self.apply(controller, changes))

    def apply(self, controller: str, changes: TableChanges) -> Snapshot:
        """The table after `changes`, as the snapshot the routing table takes."""
        workers = self._workers
        if changes.full:
            workers.clear()
        for record in changes.workers:
            workers[record.worker_id] = record
        for wid in changes.removed:
            workers.pop(wid, None)
        for wid, (running, waiting, kv) in changes.loads.items():
            known = workers.get(wid)
            if known is not None:
                # Only the counts change here; what the worker learned ships with the record.
                known.load = known.load.model_copy(
                    update={"running": running, "waiting": waiting, "kv_cache_usage": kv})
        self._source = (controller, changes.epoch, changes.revision)
        return Snapshot.model_construct(
            generation=changes.generation, heartbeat_interval=changes.heartbeat_interval,
            expiry=changes.expiry, models=changes.models, warming_up=changes.warming_up,
            workers=sorted(workers.values(), key=lambda w: w.worker_id),
            adapters=changes.adapters)

    async def _read_snapshot(self, controller: str) -> None:
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
