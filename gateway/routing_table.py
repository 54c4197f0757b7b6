"""The gateway's local routing table, kept in sync with the controller's snapshot.

Requests are routed from this table alone, with no controller round-trip per request. The table
also owns what routing needs besides the snapshot: in-flight counts, circuit breakers, routing
policies, and the bounded queue for requests that find every worker at its in-flight cap.

A request holds its worker through a `Lease`, taken by `acquire` and settled exactly once with
an `Outcome`: that one call gives back the in-flight count, tells the breaker, and reports the
latency, on every exit path. (The controller sync that fills the table lives in
gateway/controller_sync.py.)
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from controller.protocol import Snapshot, WorkerRecord, WorkerState
from fleetcore.errors import (
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    ServiceUnavailableError,
)
from gateway.breaker import Breakers
from gateway.endpoints import routed_paths, serves
from gateway.routing import Choice, LeastLoad, RouteRequest, RoutingPolicy

if TYPE_CHECKING:
    from gateway.adapters import AdapterFleet

logger = logging.getLogger(__name__)

ROUTABLE = (WorkerState.READY,)
# Told the model and seconds from arrival to the end of each answer a worker gave.
LatencyHook = Callable[[str, float], None]
# Told each request's choice of worker (gateway/shared_state.py shares it).
RoutedHook = Callable[[RouteRequest, Choice], None]


class _FleetInflight(Mapping[str, int]):
    """This gateway's requests in flight per worker plus the other gateways' (shared state)."""

    __slots__ = ("_own", "_others")

    def __init__(self, own: Mapping[str, int], others: Mapping[str, int]) -> None:
        self._own, self._others = own, others

    def __getitem__(self, worker_id: str) -> int:
        return self._own.get(worker_id, 0) + self._others.get(worker_id, 0)

    def __iter__(self) -> Iterator[str]:
        return iter(set(self._own) | set(self._others))

    def __len__(self) -> int:
        return len(set(self._own) | set(self._others))


class Outcome(enum.Enum):
    """How a request's hold on a worker ended, and so what its breaker hears."""

    DONE = "done"                      # answered to the end
    CLIENT_GONE = "client_gone"        # the client left: no verdict on the worker
    CANCELLED = "cancelled"            # the gateway stopped it (shutdown): no verdict
    RETRY_STATUS = "retry_status"      # 502/503/504 before any body: a failure, tried elsewhere
    CONNECT_ERROR = "connect_error"    # refused or reset before answering: the worker is gone
    TIMEOUT = "timeout"                # took the request and went silent
    ENGINE_ERROR = "engine_error"      # broke off or garbled a plain answer
    STREAM_BROKE = "stream_broke"      # cut, or went silent in, a stream it had begun: gone


_FAILURES = {Outcome.RETRY_STATUS: False, Outcome.TIMEOUT: False, Outcome.ENGINE_ERROR: False,
             Outcome.CONNECT_ERROR: True, Outcome.STREAM_BROKE: True}  # outcome: fatal


class Lease:
    """One request's hold on one worker: counted in flight from `acquire` until `settle`."""

    __slots__ = ("_table", "worker", "reason", "model", "started", "_trial", "answered_at",
                 "outcome")

    def __init__(self, table: RoutingTable, choice: Choice, model: str, started: float,
                 trial: bool) -> None:
        self._table = table
        self.worker = choice.worker
        self.reason = choice.reason
        self.model = model
        self.started = started
        self._trial = trial
        self.answered_at: float | None = None
        self.outcome: Outcome | None = None

    @property
    def worker_id(self) -> str:
        return self.worker.worker_id

    def answered(self) -> None:
        """The worker's answer began with a status the client gets: it is alive, so its
        breaker closes now rather than when a long stream ends."""
        if self.answered_at is None and self.outcome is None:
            self.answered_at = time.monotonic()
            self._table.breakers[self.worker_id].record_success()

    def settle(self, outcome: Outcome) -> bool:
        """End the hold; True the first time. Later calls change nothing, so every exit path
        may settle, and the first to know the outcome wins."""
        if self.outcome is not None:
            return False
        self.outcome = outcome
        self._table._settle(self, outcome)
        return True


@dataclass
class Limits:
    """The in-flight cap and the queue behind it. No defaults here: the gateway's come from its
    settings (gateway/settings.py), the one place they are declared."""

    max_inflight_per_worker: int  # 0: no cap
    queue_size: int
    queue_timeout: float


# A table built without limits (tests, tools) caps nothing, so nothing ever queues.
UNCAPPED = Limits(max_inflight_per_worker=0, queue_size=0, queue_timeout=0.0)


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
        self.limits = limits or UNCAPPED
        self.snapshot: Snapshot | None = None
        self.synced_at: float | None = None  # monotonic time of the last good sync
        self.stale = False
        self.inflight: collections.Counter[str] = collections.Counter()
        self.queued: collections.Counter[str] = collections.Counter()
        # In flight per (worker, model): what says an adapter is idle on a worker.
        self.inflight_models: collections.Counter[tuple[str, str]] = collections.Counter()
        self.adapters: AdapterFleet | None = None  # LoRA adapters (gateway/adapters.py)
        self._by_model: dict[str, list[WorkerRecord]] = {}
        self._changed = asyncio.Event()
        self.on_latency: LatencyHook | None = None
        # The other gateways' requests in flight per worker, when they share state; routing
        # policies see the sum, the in-flight cap counts this gateway's own.
        self.remote_inflight: collections.Counter[str] = collections.Counter()
        self.on_routed: RoutedHook | None = None

    def policy_for(self, model: str) -> RoutingPolicy:
        policy = self.overrides.get(model)
        if policy is None and self.adapters is not None:
            base = self.adapters.base_of(model)
            policy = self.overrides.get(base) if base is not None else None
        return policy or self.policy

    def _workers_of(self, model: str) -> list[WorkerRecord]:
        """The workers of a base model, or those holding an adapter now."""
        if self.adapters is not None and self.adapters.is_adapter(model):
            return self.adapters.workers_for(model, self._by_model)
        return self._by_model.get(model, [])

    def is_known(self, model: str) -> bool:
        """A model some worker serves or served lately, or a declared or held adapter."""
        if self.snapshot is not None and model in self.snapshot.models:
            return True
        return self.adapters is not None and self.adapters.is_adapter(model)

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
        if self.adapters is not None:
            self.adapters.update(snapshot)
        if self.snapshot is None or snapshot.generation != self.snapshot.generation:
            logger.debug("routing table generation=%d workers=%d",
                         snapshot.generation, len(snapshot.workers))
            live = {w.worker_id for w in snapshot.workers}
            self.breakers.forget(live)
            for policy in (self.policy, *self.overrides.values()):
                policy.forget(live)
            self._wake_waiters()
        self.snapshot = snapshot
        self.synced_at = time.monotonic()
        self.stale = False

    def mark_stale(self) -> None:
        """No controller answers: keep routing on the last snapshot, and say so."""
        self.stale = True

    def _routable(self, workers: Iterable[WorkerRecord], exclude: set[str]) -> list[WorkerRecord]:
        return [
            w for w in workers
            if w.state in ROUTABLE and w.worker_id not in exclude
            and self.breakers.allows(w.worker_id)
        ]

    def worker_counts(self, serves: Callable[[str], bool] | None = None) -> tuple[int, int]:
        """Workers in the table, and those routable now; with `serves`, only the workers of
        at least one model it accepts."""
        workers = self.snapshot.workers if self.snapshot is not None else []
        if serves is not None:
            workers = [w for w in workers if any(serves(m) for m in w.model_names)]
        return len(workers), len(self._routable(workers, set()))

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
        if self.adapters is not None:
            model = self.adapters.base_of(model) or model
        lens = [w.max_model_len for w in self._by_model.get(model, ()) if w.max_model_len]
        return min(lens, default=None)

    def candidates(self, model: str, exclude: set[str] | None = None,
                   path: str | None = None) -> list[WorkerRecord]:
        """Routable workers for `model` whose engines serve `path`; raises 404 for an unknown
        model, 400 for an endpoint its engines do not serve, 503 for none ready."""
        exclude = exclude or set()
        workers = self._workers_of(model)
        known = self.is_known(model)
        if not workers and not known:
            available = ", ".join(sorted(self.models())) or "none"
            raise NotFoundError(
                f"The model '{model}' does not exist. Models being served: {available}.",
                param="model", code="model_not_found",
            )
        if path is not None:
            serving = [(w, serves(w, path)) for w in workers]
            if workers and not any(ok is not False for _, ok in serving):
                offered = ", ".join(routed_paths(workers)) or "nothing the gateway routes"
                raise InvalidRequestError(
                    f"The model '{model}' does not serve {path}; its engines serve {offered}.",
                    param="model", code="unsupported_endpoint",
                )
            workers = [w for w, ok in serving if ok]
        candidates = self._routable(workers, exclude)
        if not candidates:
            workers = self._workers_of(model)
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
        pin = request.worker_id
        if pin is not None and all(w.worker_id != pin for w in self._workers_of(request.model)):
            raise NotFoundError(
                f"Worker {pin}, which held what this request is about, has left the fleet.",
                code="worker_gone")
        candidates = self.candidates(request.model, exclude, request.path)
        if pin is not None:
            candidates = [w for w in candidates if w.worker_id == pin]
            if not candidates:
                raise ServiceUnavailableError(
                    f"Worker {request.worker_id}, which holds what this request is about, is "
                    "not available now.", code="no_worker_available",
                    headers={"Retry-After": "2"})
        cap = self.limits.max_inflight_per_worker
        if cap:
            candidates = [w for w in candidates if self.inflight[w.worker_id] < cap]
            if not candidates:
                return None
        if request.prefer:
            candidates = [w for w in candidates if w.worker_id in request.prefer] or candidates
        inflight: Mapping[str, int] = self.inflight
        if self.remote_inflight:
            inflight = _FleetInflight(self.inflight, self.remote_inflight)
        return self.policy_for(request.model).choose(request, candidates, inflight)

    async def acquire(self, request: RouteRequest, exclude: set[str] | None = None,
                      started: float | None = None) -> Lease:
        """Choose a worker and hold it for the request; queue while all are full.

        `started` is the request's arrival (monotonic), which its latency counts from."""
        choice = self.choose(request, exclude)
        if choice is None:
            choice = await self._queue(request, exclude)
        wid = choice.worker.worker_id
        self.inflight[wid] += 1
        self.inflight_models[(wid, request.model)] += 1
        if request.adapter is not None and self.adapters is not None:
            self.adapters.touch(wid, request.adapter)
        if self.on_routed is not None:
            self.on_routed(request, choice)
        trial = self.breakers[wid].acquire()
        return Lease(self, choice, request.model,
                     time.monotonic() if started is None else started, trial)

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

    def _settle(self, lease: Lease, outcome: Outcome) -> None:
        wid = lease.worker_id
        self.inflight[wid] -= 1
        if self.inflight[wid] <= 0:
            del self.inflight[wid]
        key = (wid, lease.model)
        self.inflight_models[key] -= 1
        if self.inflight_models[key] <= 0:
            del self.inflight_models[key]
        breaker = self.breakers[wid]
        fatal = _FAILURES.get(outcome)
        if fatal is not None:
            breaker.record_failure(fatal=fatal)
        elif lease.answered_at is None:
            if outcome is Outcome.DONE:  # an answer that ended before anyone called answered()
                lease.answered_at = time.monotonic()
                breaker.record_success()
            elif lease._trial:
                breaker.abandon_trial()
        self._wake_waiters()
        if self.adapters is not None:
            self.adapters.wake()  # a slot may be idle now: requests waiting for one look again
        if lease.answered_at is not None and self.on_latency is not None:
            self.on_latency(lease.model, time.monotonic() - lease.started)
