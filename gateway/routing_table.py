"""The gateway's local routing table, kept in sync with the controller's snapshot.

Requests are routed from this table alone: no controller round-trip per request.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Iterable

import aiohttp

from controller.protocol import Snapshot, WorkerRecord, WorkerState
from fleet.errors import NotFoundError, ServiceUnavailableError
from gateway.routing import RoutingPolicy

logger = logging.getLogger(__name__)

ROUTABLE = (WorkerState.READY,)


class RoutingTable:
    def __init__(self, policy: RoutingPolicy, *, suspect_for: float = 5.0) -> None:
        self.policy = policy
        self.snapshot: Snapshot | None = None
        self.synced_at: float | None = None  # monotonic time of the last good sync
        self.stale = False
        self.inflight: collections.Counter[str] = collections.Counter()
        # Workers that just refused a connection are skipped until the controller has had time
        # to learn the same thing.
        self._suspect_until: dict[str, float] = {}
        self._suspect_for = suspect_for
        self._by_model: dict[str, list[WorkerRecord]] = {}

    def update(self, snapshot: Snapshot) -> None:
        by_model: dict[str, list[WorkerRecord]] = {}
        for worker in snapshot.workers:
            for name in worker.model_names:
                by_model.setdefault(name, []).append(worker)
        self._by_model = by_model
        if self.snapshot is None or snapshot.generation != self.snapshot.generation:
            logger.debug("routing table generation=%d workers=%d",
                         snapshot.generation, len(snapshot.workers))
        self.snapshot = snapshot
        self.synced_at = time.monotonic()
        self.stale = False
        self._suspect_for = max(self._suspect_for, snapshot.expiry)

    def mark_suspect(self, worker_id: str) -> None:
        self._suspect_until[worker_id] = time.monotonic() + self._suspect_for
        logger.warning("worker suspect worker_id=%s for=%.0fs", worker_id, self._suspect_for)

    def _routable(self, workers: Iterable[WorkerRecord], exclude: set[str]) -> list[WorkerRecord]:
        now = time.monotonic()
        return [
            w for w in workers
            if w.state in ROUTABLE
            and w.worker_id not in exclude
            and self._suspect_until.get(w.worker_id, 0.0) <= now
        ]

    def models(self) -> dict[str, list[WorkerRecord]]:
        """Models with at least one routable worker."""
        out = {}
        for name, workers in self._by_model.items():
            routable = self._routable(workers, set())
            if routable:
                out[name] = routable
        return out

    def pick(self, model: str, exclude: set[str] | None = None) -> WorkerRecord:
        exclude = exclude or set()
        workers = self._by_model.get(model, [])
        known = self.snapshot is not None and model in self.snapshot.models
        if not workers and not known:
            available = ", ".join(sorted(self.models())) or "none"
            raise NotFoundError(
                f"The model '{model}' does not exist. Models being served: {available}.",
                param="model", code="model_not_found",
            )
        candidates = self._routable(workers, exclude)
        if not candidates:
            states = collections.Counter(w.state.value for w in workers)
            detail = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none registered"
            raise ServiceUnavailableError(
                f"No worker is available for model '{model}' right now (workers: {detail}"
                f"{', tried ' + str(len(exclude)) if exclude else ''}). Retry shortly.",
                param="model", code="no_worker_available", headers={"Retry-After": "2"},
            )
        return self.policy.choose(candidates, self.inflight)

    async def sync_once(self, session: aiohttp.ClientSession, controller: str) -> None:
        async with session.get(
            f"{controller}/snapshot", timeout=aiohttp.ClientTimeout(total=2.0)
        ) as response:
            response.raise_for_status()
            self.update(Snapshot.model_validate_json(await response.read()))

    async def sync_forever(
        self, session: aiohttp.ClientSession, controller: str, interval: float
    ) -> None:
        controller = controller.rstrip("/")
        while True:
            try:
                await self.sync_once(session, controller)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                if not self.stale:
                    logger.warning("controller sync failed; routing on the last table "
                                   "address=%s error=%r", controller, exc)
                self.stale = True
            await asyncio.sleep(interval)
