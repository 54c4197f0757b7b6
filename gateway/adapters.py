"""LoRA adapters across the fleet, as one gateway sees and places them.

`AdapterFleet` knows the catalogue (declared adapters, from the controller's snapshot) and which
worker holds which adapter: what workers report, overlaid for `hold` seconds by what this
gateway itself just loaded or unloaded (reports lag by a heartbeat and a sync). For a request
naming an adapter, `ensure` asks the placement policy (gateway/lora_placement.py) what to do,
starts at most one load per adapter at a time (single-flight: many requests arriving together
cause one load), and makes the request wait for it, bounded by `wait_timeout` (then 503 with
Retry-After). The routing table then routes it among the workers that hold the adapter.

An adapter is unloaded only with nothing of it in flight: to make room for another (the
coldest: fewest requests lately, `heat`, then least recently used), to shrink a cold copy, or
because it left the catalogue.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiohttp

from controller.protocol import AdapterSpec, Snapshot, WorkerRecord
from fleetcore.errors import NotFoundError, ServiceUnavailableError
from gateway.lora_placement import Load, PlacementPolicy, Slots, Use
from gateway.routing import RouteRequest, load_score

if TYPE_CHECKING:
    from gateway.routing_table import RoutingTable

logger = logging.getLogger(__name__)

_ENGINE_TIMEOUT = aiohttp.ClientTimeout(total=120.0, sock_connect=5.0)
_ALREADY_LOADED = "has already been loaded"


class AdapterLoadFailed(RuntimeError):
    pass


class AdapterFleet:
    def __init__(self, table: RoutingTable, policy: PlacementPolicy, *, wait_timeout: float,
                 hold: float = 10.0, failure_backoff: float = 5.0,
                 heat_half_life: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._table = table
        self.policy = policy
        self.wait_timeout = wait_timeout
        self._hold = hold
        self._failure_backoff = failure_backoff
        self._heat_half_life = heat_half_life
        self._clock = clock
        self.session: aiohttp.ClientSession | None = None  # set by the gateway's lifespan
        self.catalogue: dict[str, AdapterSpec] = {}
        self._reported: dict[str, set[str]] = {}
        self._static: dict[str, set[str]] = {}
        self._base_of_held: dict[str, str] = {}  # adapters held but not declared (static)
        # This gateway's own actions: (worker, adapter) -> (held, when); they win over reports
        # for `hold` seconds.
        self._local: dict[tuple[str, str], tuple[bool, float]] = {}
        self._last_used: dict[tuple[str, str], float] = {}
        # Requests sent to each copy, decayed with `heat_half_life`: (count, as of when).
        self._heat: dict[tuple[str, str], tuple[float, float]] = {}
        self._pending: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._failed: dict[str, tuple[str, float]] = {}
        self._changed = asyncio.Event()
        # Read by the metrics collector: (adapter, reason) -> count.
        self.loads: collections.Counter[tuple[str, str]] = collections.Counter()
        self.unloads: collections.Counter[tuple[str, str]] = collections.Counter()
        self.load_failures: collections.Counter[str] = collections.Counter()

    # --- what is where ---

    def update(self, snapshot: Snapshot) -> None:
        self.catalogue = {a.name: a for a in snapshot.adapters}
        now = self._clock()
        self._reported = {w.worker_id: set(w.adapters) for w in snapshot.workers}
        self._static = {w.worker_id: set(w.static_adapters) for w in snapshot.workers}
        # Held but not declared: the static adapters are served as they are; any other is
        # on its way out (removed from the catalogue) and is not offered any more.
        self._base_of_held = {a: w.model_names[0] for w in snapshot.workers
                              for a in w.static_adapters}
        self._last_used = {k: v for k, v in self._last_used.items() if k[0] in self._reported}
        self._heat = {k: v for k, v in self._heat.items() if k[0] in self._reported}
        for wid, held in self._reported.items():
            for adapter in held:
                # A copy this gateway has not used counts as used when first seen: it is not
                # the first to go just for being someone else's.
                self._last_used.setdefault((wid, adapter), now)
        self._local = {k: v for k, v in self._local.items()
                       if now - v[1] < self._hold and k[0] in self._reported}
        self.wake()

    def wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def is_adapter(self, name: str) -> bool:
        return name in self.catalogue or name in self._base_of_held

    def base_of(self, name: str) -> str | None:
        spec = self.catalogue.get(name)
        return spec.base_model if spec is not None else self._base_of_held.get(name)

    def resident(self, worker_id: str) -> set[str]:
        held = set(self._reported.get(worker_id, ()))
        for (wid, adapter), (is_held, _) in self._local.items():
            if wid == worker_id:
                (held.add if is_held else held.discard)(adapter)
        return held

    def listing(self) -> list[tuple[str, str, str]]:
        """(name, source, base model) of every declared or static adapter."""
        out = {name: (name, spec.source, spec.base_model) for name, spec in self.catalogue.items()}
        for name, base in self._base_of_held.items():
            out.setdefault(name, (name, name, base))
        return [out[name] for name in sorted(out)]

    def holders(self, adapter: str) -> set[str]:
        return {wid for wid in self._reported if adapter in self.resident(wid)}

    def workers_for(self, adapter: str, by_model: dict[str, list[WorkerRecord]]
                    ) -> list[WorkerRecord]:
        """The workers of the adapter's base model that hold it now."""
        base = self.base_of(adapter)
        holders = self.holders(adapter)
        return [w for w in by_model.get(base or "", []) if w.worker_id in holders]

    def _slots(self, base: str) -> list[Slots]:
        table = self._table
        now = self._clock()
        workers = [w for w in table.models().get(base, []) if w.lora_slots]
        views = []
        for w in workers:
            wid = w.worker_id
            static = self._static.get(wid, set())
            busy = set(w.load.busy_adapters)  # other gateways' requests too
            resident = {a: Use(inflight=table.inflight_models[(wid, a)],
                               last_used=self._last_used.get((wid, a), 0.0),
                               heat=self.heat(wid, a, now), static=a in static,
                               busy=a in busy)
                        for a in self.resident(wid)}
            pending = frozenset(a for (pw, a) in self._pending if pw == wid)
            views.append(Slots(wid, w.lora_slots or 0, load_score(w, table.inflight),
                               resident, pending, w.lora_batch_slots or w.lora_slots or 0))
        return views

    def lost(self, worker_id: str, adapter: str) -> None:
        """The worker's engine answered that it does not hold the adapter."""
        self._mark(worker_id, adapter, held=False)
        self.wake()

    def touch(self, worker_id: str, adapter: str) -> None:
        """A request for `adapter` was sent to the worker: it is recently used there."""
        now = self._clock()
        self._last_used[(worker_id, adapter)] = now
        self._heat[(worker_id, adapter)] = (self.heat(worker_id, adapter, now) + 1.0, now)

    def heat(self, worker_id: str, adapter: str, now: float) -> float:
        """Requests sent to this copy lately, each counting half after `heat_half_life`."""
        count, when = self._heat.get((worker_id, adapter), (0.0, now))
        return float(count * 0.5 ** (max(0.0, now - when) / self._heat_half_life))

    # --- placing ---

    async def ensure(self, route: RouteRequest) -> None:
        """Wait until the adapter `route` names is held where the request may go (loading it
        if needed); no-op for a base model. Raises 503 with Retry-After past `wait_timeout`."""
        adapter = route.model
        base = self.base_of(adapter)
        if base is None:
            return
        route.adapter = adapter
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_timeout
        while True:
            if self.base_of(adapter) is None:  # removed while the request waited
                raise NotFoundError(f"The model '{adapter}' does not exist (any more).",
                                    param="model", code="model_not_found")
            self._table.candidates(base, path=route.path)  # 404/400/503 for the base itself
            failed = self._failed.get(adapter)
            # After a failed load, requests hear of it for a while rather than each try again.
            backing_off = failed is not None and \
                self._clock() - failed[1] < self._failure_backoff
            workers = self._slots(base)
            decision = self.policy.decide(adapter, workers, self._clock())
            if decision.load is not None and not backing_off:
                self._start(adapter, decision.load, pinned=decision.pin is not None)
            if not decision.wait:
                if decision.pin is not None:
                    route.worker_id = decision.pin
                route.prefer = decision.prefer
                return
            if not workers:
                raise ServiceUnavailableError(
                    f"No worker of base model '{base}' serves LoRA adapters (start its workers "
                    "with --enable-lora).", param="model", code="no_lora_worker",
                    headers={"Retry-After": "10"})
            loading = any(a == adapter for (_, a) in self._pending)
            if failed is not None and backing_off and not loading:
                raise ServiceUnavailableError(
                    f"Adapter '{adapter}' could not be loaded: {failed[0]}", param="model",
                    code="adapter_load_failed", headers={"Retry-After": "5"})
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ServiceUnavailableError(
                    f"Adapter '{adapter}' is not loaded on any worker yet and every adapter "
                    f"slot is busy; waited {self.wait_timeout:g}s. Retry shortly.",
                    param="model", code="adapter_not_ready", headers={"Retry-After": "2"})
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except asyncio.TimeoutError:
                continue

    def _start(self, adapter: str, load: Load, *, pinned: bool) -> None:
        key = (load.worker_id, adapter)
        if key in self._pending or (not pinned and any(a == adapter for _, a in self._pending)):
            return  # single flight: that load is what everyone waits for
        spec = self.catalogue.get(adapter)
        if spec is None:
            return  # held somewhere but not declared: nothing to load it from
        if load.evict is not None:
            # Out of the view at once: nothing new is routed to it while it is unloaded.
            self._mark(load.worker_id, load.evict, held=False)
        task = asyncio.create_task(self._load(load, spec))
        self._pending[key] = task
        task.add_done_callback(lambda _: self._loaded(key))

    def _loaded(self, key: tuple[str, str]) -> None:
        self._pending.pop(key, None)
        self.wake()

    def _mark(self, worker_id: str, adapter: str, *, held: bool) -> None:
        self._local[(worker_id, adapter)] = (held, self._clock())

    def _worker(self, worker_id: str) -> WorkerRecord | None:
        snapshot = self._table.snapshot
        workers = snapshot.workers if snapshot is not None else []
        return next((w for w in workers if w.worker_id == worker_id), None)

    async def _load(self, load: Load, spec: AdapterSpec) -> None:
        wid = load.worker_id
        started = self._clock()
        try:
            if load.evict is not None:
                await self._unload(wid, load.evict, "evict")
            await self._engine_post(wid, "/v1/load_lora_adapter",
                                    {"lora_name": spec.name, "lora_path": spec.source})
        except (AdapterLoadFailed, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self.load_failures[spec.name] += 1
            self._failed[spec.name] = (str(exc) or type(exc).__name__, self._clock())
            logger.warning("adapter load failed adapter=%s worker=%s error=%s", spec.name, wid,
                           exc)
            return
        self._mark(wid, spec.name, held=True)
        self._last_used[(wid, spec.name)] = self._clock()
        self._failed.pop(spec.name, None)
        self.loads[(spec.name, load.reason)] += 1
        logger.info("adapter loaded adapter=%s worker=%s reason=%s evicted=%s seconds=%.2f",
                    spec.name, wid, load.reason, load.evict or "-", self._clock() - started)

    async def _unload(self, worker_id: str, adapter: str, reason: str) -> None:
        self._mark(worker_id, adapter, held=False)
        try:
            await self._engine_post(worker_id, "/v1/unload_lora_adapter", {"lora_name": adapter},
                                    missing_ok=True)
        finally:
            self._last_used.pop((worker_id, adapter), None)
            self._heat.pop((worker_id, adapter), None)
        self.unloads[(adapter, reason)] += 1
        logger.info("adapter unloaded adapter=%s worker=%s reason=%s", adapter, worker_id,
                    reason)

    async def _engine_post(self, worker_id: str, path: str, body: dict[str, str], *,
                           missing_ok: bool = False) -> None:
        worker = self._worker(worker_id)
        if worker is None or self.session is None:
            raise AdapterLoadFailed(f"worker {worker_id} is gone")
        headers = {"Authorization": f"Bearer {worker.engine_api_key}"} \
            if worker.engine_api_key else {}
        url = f"{str(worker.engine_url).rstrip('/')}{path}"
        async with self.session.post(url, json=body, headers=headers,
                                     timeout=_ENGINE_TIMEOUT) as response:
            if response.status == 200:
                return
            text = (await response.text())[:500]
            if missing_ok and response.status == 404:
                return
            if response.status == 400 and _ALREADY_LOADED in text:
                return  # another gateway loaded it first
            raise AdapterLoadFailed(f"worker {worker_id} answered {path} with "
                                    f"{response.status}: {text}")

    # --- upkeep ---

    def upkeep(self) -> list[asyncio.Task[None]]:
        """Unload cold copies and adapters that left the catalogue (nothing in flight); run
        after every sync. Returns the unloads started."""
        tasks = []
        now = self._clock()
        bases = {w.model_names[0] for w in (self._table.snapshot.workers
                                            if self._table.snapshot else []) if w.lora_slots}
        for base in sorted(bases):
            workers = self._slots(base)
            doomed = set(self.policy.shrink(workers, now))
            for w in workers:
                for adapter, use in w.resident.items():
                    if not use.static and not use.busy and use.inflight == 0 \
                            and adapter not in self.catalogue \
                            and (w.worker_id, adapter) not in self._local:
                        doomed.add((w.worker_id, adapter))
            for wid, adapter in sorted(doomed):
                if any(pw == wid for pw, _ in self._pending):
                    continue
                reason = "shrink" if adapter in self.catalogue else "removed"
                tasks.append(asyncio.create_task(self._quiet_unload(wid, adapter, reason)))
        return tasks

    async def _quiet_unload(self, worker_id: str, adapter: str, reason: str) -> None:
        try:
            await self._unload(worker_id, adapter, reason)
        except (AdapterLoadFailed, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            logger.warning("adapter unload failed adapter=%s worker=%s error=%s", adapter,
                           worker_id, exc)

    def forget(self, adapter: str) -> None:
        """The adapter left the catalogue (through this gateway): unloaded at the next upkeep."""
        self.catalogue.pop(adapter, None)
        self._failed.pop(adapter, None)

    def declare(self, spec: AdapterSpec) -> None:
        """The adapter was declared through this gateway: usable before the next sync."""
        self.catalogue[spec.name] = spec
        self._failed.pop(spec.name, None)
        self.wake()
