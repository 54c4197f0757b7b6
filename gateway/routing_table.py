"""The gateway's local routing table, kept in sync with the controller's snapshot.

Requests are routed from this table alone, with no controller round-trip per request. The table
also owns what routing needs besides the snapshot: in-flight counts, circuit breakers, routing
policies, and the bounded queue for requests that find every worker at its in-flight cap.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import aiohttp

from controller.protocol import Snapshot, WorkerRecord, WorkerState
from fleet.errors import FleetError, NotFoundError, ServiceUnavailableError
from gateway.breaker import Breakers
from gateway.routing import CacheAware, Choice, LeastLoad, RouteRequest, RoutingPolicy

logger = logging.getLogger(__name__)

ROUTABLE = (WorkerState.READY,)


class OverloadedError(FleetError):
    status_code = 429
    type = "rate_limit_error"
    code = "overloaded"


@dataclass
class Limits:
    max_inflight_per_worker: int = 0  # 0: no cap
    queue_size: int = 1024
    queue_timeout: float = 30.0


class RoutingTable:
    def __init__(
        self,
        policy: RoutingPolicy | None = None,
        *,
        overrides: Mapping[str, RoutingPolicy] | None = None,
        breakers: Breakers | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.policy = policy or LeastLoad()
        self.overrides = dict(overrides or {})
        self.breakers = breakers or Breakers()
        self.limits = limits or Limits()
        self.snapshot: Snapshot | None = None
        self.synced_at: float | None = None  # monotonic time of the last good sync
        self.stale = False
        self.inflight: collections.Counter[str] = collections.Counter()
        self.queued: collections.Counter[str] = collections.Counter()
        self._by_model: dict[str, list[WorkerRecord]] = {}
        self._changed = asyncio.Event()

    def policy_for(self, model: str) -> RoutingPolicy:
        return self.overrides.get(model, self.policy)

    def _wake_waiters(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def update(self, snapshot: Snapshot) -> None:
        if snapshot.warming_up and self.snapshot is not None:
            # A controller that just (re)started knows only the workers that have heartbeated
            # since: keep routing to the others until they have had time to register again.
            seen = {w.worker_id for w in snapshot.workers}
            snapshot = snapshot.model_copy(update={
                "workers": [*snapshot.workers,
                            *(w for w in self.snapshot.workers if w.worker_id not in seen)],
                "models": sorted({*snapshot.models, *self.snapshot.models}),
            })
        by_model: dict[str, list[WorkerRecord]] = {}
        for worker in snapshot.workers:
            for name in worker.model_names:
                by_model.setdefault(name, []).append(worker)
        self._by_model = by_model
        if self.snapshot is None or snapshot.generation != self.snapshot.generation:
            logger.debug("routing table generation=%d workers=%d",
                         snapshot.generation, len(snapshot.workers))
            live = {w.worker_id for w in snapshot.workers}
            self.breakers.forget(live)
            for policy in (self.policy, *self.overrides.values()):
                if isinstance(policy, CacheAware):
                    policy.forget(live)
            self._wake_waiters()
        self.snapshot = snapshot
        self.synced_at = time.monotonic()
        self.stale = False

    def _routable(self, workers: Iterable[WorkerRecord], exclude: set[str]) -> list[WorkerRecord]:
        return [
            w for w in workers
            if w.state in ROUTABLE and w.worker_id not in exclude
            and self.breakers.allows(w.worker_id)
        ]

    def routable_count(self) -> int:
        workers = self.snapshot.workers if self.snapshot is not None else []
        return len(self._routable(workers, set()))

    def models(self) -> dict[str, list[WorkerRecord]]:
        """Models with at least one routable worker."""
        out = {}
        for name, workers in self._by_model.items():
            routable = self._routable(workers, set())
            if routable:
                out[name] = routable
        return out

    def max_model_len(self, model: str) -> int | None:
        """The smallest context any worker of the model reported, if any did."""
        lens = [w.max_model_len for w in self._by_model.get(model, ()) if w.max_model_len]
        return min(lens, default=None)

    def candidates(self, model: str, exclude: set[str] | None = None) -> list[WorkerRecord]:
        """Routable workers for `model`; raises 404 for an unknown model, 503 for none ready."""
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
            tried = f"; {len(exclude)} failed for this request" if exclude else ""
            raise ServiceUnavailableError(
                f"No worker is available for model '{model}' right now (workers: {detail}"
                f"{tried}). Retry shortly.",
                param="model", code="no_worker_available", headers={"Retry-After": "2"},
            )
        return candidates

    def choose(self, request: RouteRequest, exclude: set[str] | None = None) -> Choice | None:
        """A worker under its in-flight cap, or None when all are at the cap."""
        candidates = self.candidates(request.model, exclude)
        cap = self.limits.max_inflight_per_worker
        if cap:
            candidates = [w for w in candidates if self.inflight[w.worker_id] < cap]
            if not candidates:
                return None
        return self.policy_for(request.model).choose(request, candidates, self.inflight)

    async def acquire(self, request: RouteRequest, exclude: set[str] | None = None) -> Choice:
        """Choose a worker and count the request in flight to it; queue while all are full."""
        choice = self.choose(request, exclude)
        if choice is None:
            choice = await self._queue(request, exclude)
        self.inflight[choice.worker.worker_id] += 1
        self.breakers[choice.worker.worker_id].acquire()
        return choice

    async def _queue(self, request: RouteRequest, exclude: set[str] | None) -> Choice:
        limits, model = self.limits, request.model
        if self.queued[model] >= limits.queue_size:
            raise OverloadedError(
                f"Every worker of model '{model}' is at its limit of "
                f"{limits.max_inflight_per_worker} requests and the queue is full "
                f"({limits.queue_size}). Retry later.",
                headers={"Retry-After": "1"},
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.queue_timeout
        self.queued[model] += 1
        try:
            while (choice := self.choose(request, exclude)) is None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise OverloadedError(
                        f"Waited {limits.queue_timeout:g}s for a free worker of model "
                        f"'{model}'; all are busy. Retry later.",
                        headers={"Retry-After": "1"},
                    )
                changed = self._changed
                try:
                    await asyncio.wait_for(changed.wait(), remaining)
                except asyncio.TimeoutError:
                    continue
            return choice
        finally:
            self.queued[model] -= 1
            if self.queued[model] <= 0:
                del self.queued[model]

    def release(self, worker_id: str) -> None:
        self.inflight[worker_id] -= 1
        if self.inflight[worker_id] <= 0:
            del self.inflight[worker_id]
        self._wake_waiters()

    async def sync_once(self, session: aiohttp.ClientSession, controller: str,
                        headers: Mapping[str, str] | None = None) -> None:
        async with session.get(
            f"{controller}/snapshot", timeout=aiohttp.ClientTimeout(total=2.0), headers=headers
        ) as response:
            response.raise_for_status()
            self.update(Snapshot.model_validate_json(await response.read()))

    async def sync_forever(
        self, session: aiohttp.ClientSession, controllers: list[str], interval: float,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Sync from the first controller that answers, starting with the last good one.

        `headers` carry the token that lets the gateway read the snapshot."""
        controllers = [c.rstrip("/") for c in controllers]
        current = 0
        while True:
            for attempt in range(len(controllers)):
                index = (current + attempt) % len(controllers)
                try:
                    await self.sync_once(session, controllers[index], headers)
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                    refused = isinstance(exc, aiohttp.ClientResponseError) and \
                        exc.status in (401, 403)
                    if refused and not self.stale:
                        logger.error("controller refused the gateway's token address=%s: set "
                                     "FLEET_READ_TOKEN or FLEET_CLUSTER_TOKEN error=%r",
                                     controllers[index], exc)
                    elif not self.stale:
                        logger.warning("controller sync failed address=%s error=%r",
                                       controllers[index], exc)
                    continue
                if index != current:
                    logger.info("syncing from controller address=%s", controllers[index])
                current = index
                break
            else:
                if not self.stale:
                    logger.warning("no controller answers; routing on the last table")
                self.stale = True
            await asyncio.sleep(interval)
