"""Where LoRA adapters go: placement policies, pure logic over a view of the workers' slots.

A policy sees, for one base model, each routable worker's adapter slots (what it holds, what is
in flight on each, when each was last used and how many requests it drew lately) and decides,
for a request naming an adapter, whether to load it somewhere and whether the request must
wait for that load:

- `DemandPlacement` (the default): route to the workers that hold the adapter; if none does,
  load it on the worker with a free slot whose adapters draw the least demand (then the least
  load), so that each worker's set of adapters is stable and the demand on the workers
  balanced; with no free slot, in place of the coldest adapter with nothing in flight (the
  least recent requests, decayed; then the least recently used), so that the hottest is not
  the victim between two of its requests. A hot adapter gets one more copy once its requests
  in flight per copy reach `spread_free_at` while some worker has a free slot for it (a load,
  no eviction), or `spread_at` if that copy must push out another; a copy idle for
  `shrink_after` seconds, with another copy elsewhere, is unloaded (`shrink`).
- `NaivePlacement` ("load wherever the first request lands"): the least-loaded worker of the
  base model takes the request and loads the adapter if it lacks it. It is the baseline that
  bench/lora_bench.py measures the default against.

The asyncio side (single-flight loads, waiting, the engines' endpoints) is gateway/adapters.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Use:
    """One adapter on one worker."""

    inflight: int = 0
    last_used: float = 0.0
    heat: float = 0.0  # requests sent to this copy lately, decayed (gateway/adapters.py)
    static: bool = False  # started with the engine (--lora-modules): never unloaded
    busy: bool = False  # the engine reports requests for it (from any gateway): not unloaded


@dataclass(frozen=True)
class Slots:
    """One routable worker of the base model, as placement sees it."""

    worker_id: str
    capacity: int  # --max-loras
    load: float  # the routing load score (gateway/routing.py)
    resident: Mapping[str, Use] = field(default_factory=dict)
    pending: frozenset[str] = frozenset()  # being loaded: they take a slot, serve nothing yet
    batch_slots: int = 0  # distinct adapters one engine step runs (--max-loras); 0: unknown

    @property
    def free(self) -> int:
        return self.capacity - len(self.resident) - len(self.pending)

    def blocks(self, adapter: str) -> bool:
        """A request for `adapter` sent here now would wait in the engine: its batch slots are
        taken by other adapters with requests in flight."""
        running = {name for name, use in self.resident.items() if use.inflight > 0 or use.busy}
        return 0 < self.batch_slots <= len(running) and adapter not in running

    @property
    def demand(self) -> float:
        """How much traffic the adapters held here draw (the copies' heat)."""
        return sum(use.heat for use in self.resident.values())

    def evictable(self, now: float, min_idle: float) -> list[tuple[str, Use]]:
        return [(name, use) for name, use in self.resident.items()
                if not use.static and not use.busy and use.inflight == 0
                and now - use.last_used >= min_idle]


@dataclass(frozen=True)
class Load:
    worker_id: str
    evict: str | None = None  # unloaded first, to make room
    reason: str = "first_use"


@dataclass(frozen=True)
class Decision:
    """What to do for one request naming an adapter."""

    load: Load | None = None  # start this load (the caller makes sure it runs once)
    wait: bool = False  # the request waits for an adapter to be resident where it may go
    pin: str | None = None  # the request goes to this worker only
    prefer: frozenset[str] = frozenset()  # these first, among the workers it may go to


class PlacementPolicy(Protocol):
    name: str

    def decide(self, adapter: str, workers: Sequence[Slots], now: float) -> Decision: ...

    def shrink(self, workers: Sequence[Slots], now: float) -> list[tuple[str, str]]:
        """(worker id, adapter) copies to unload now."""


def _coldest(workers: Sequence[Slots], now: float, min_idle: float
             ) -> tuple[Slots, str] | None:
    """The evictable copy with the least recent demand, then the least recently used."""
    victims = [(use.heat, use.last_used, w.load, w.worker_id, name, w)
               for w in workers for name, use in w.evictable(now, min_idle)]
    if not victims:
        return None
    *_, name, worker = min(victims, key=lambda v: v[:5])
    return worker, name


def _least_recently_used(workers: Sequence[Slots], now: float, min_idle: float
                         ) -> tuple[Slots, str] | None:
    victims = [(use.last_used, w.load, w.worker_id, name, w)
               for w in workers for name, use in w.evictable(now, min_idle)]
    if not victims:
        return None
    *_, name, worker = min(victims, key=lambda v: v[:4])
    return worker, name


class DemandPlacement:
    name = "demand"

    def __init__(self, *, spread_at: int = 4, spread_free_at: int = 2,
                 shrink_after: float = 30.0, spread_min_idle: float = 5.0,
                 batch_aware: bool = False) -> None:
        if spread_at < 1 or spread_free_at < 1:
            raise ValueError("spread_at and spread_free_at must be at least 1")
        self.spread_at = spread_at
        # A copy into a free slot costs a load and nothing else: it is made earlier.
        self.spread_free_at = min(spread_free_at, spread_at)
        self.shrink_after = shrink_after
        # Prefer, among an adapter's holders, one whose engine has a batch slot for it (off by
        # default: even with load alone on the CPU bench, bench/RESULTS.md).
        self.batch_aware = batch_aware
        # Spreading may push out another adapter only if that one has been idle this long, so
        # that two hot adapters do not take each other's slots in turn.
        self.spread_min_idle = spread_min_idle

    def _room(self, workers: Sequence[Slots], now: float, min_idle: float, reason: str
              ) -> Load | None:
        free = [w for w in workers if w.free > 0]
        if free:
            best = min(free, key=lambda w: (w.demand, w.load, -w.free, w.worker_id))
            return Load(best.worker_id, reason=reason)
        victim = _coldest(workers, now, min_idle)
        if victim is None:
            return None
        worker, name = victim
        return Load(worker.worker_id, evict=name, reason=reason)

    def decide(self, adapter: str, workers: Sequence[Slots], now: float) -> Decision:
        holders = [w for w in workers if adapter in w.resident]
        if not holders:
            return Decision(load=self._room(workers, now, 0.0, "first_use"), wait=True)
        # Holders whose engine can run it in the next step, if only some can.
        ready = frozenset(w.worker_id for w in holders if not w.blocks(adapter)) \
            if self.batch_aware else frozenset()
        prefer = ready if len(ready) < len(holders) else frozenset()
        inflight = sum(w.resident[adapter].inflight for w in holders)
        if inflight < self.spread_free_at * len(holders):
            return Decision(prefer=prefer)
        others = [w for w in workers if adapter not in w.resident and adapter not in w.pending]
        if inflight < self.spread_at * len(holders):
            others = [w for w in others if w.free > 0]  # early: only where nothing goes out
        return Decision(load=self._room(others, now, self.spread_min_idle, "spread"),
                        prefer=prefer)

    def shrink(self, workers: Sequence[Slots], now: float) -> list[tuple[str, str]]:
        copies: dict[str, list[tuple[Slots, Use]]] = {}
        for w in workers:
            for name, use in w.resident.items():
                copies.setdefault(name, []).append((w, use))
        out = []
        for name, held in sorted(copies.items()):
            # The copy in use, else the most recently used one, stays, whatever its age.
            held.sort(key=lambda wu: (wu[1].inflight == 0, -wu[1].last_used, wu[0].worker_id))
            for worker, use in held[1:]:
                if not use.static and not use.busy and use.inflight == 0 and \
                        now - use.last_used >= self.shrink_after:
                    out.append((worker.worker_id, name))
        return out


class NaivePlacement:
    """The least-loaded worker takes the request and loads what it lacks (a baseline)."""

    name = "naive"

    def decide(self, adapter: str, workers: Sequence[Slots], now: float) -> Decision:
        if not workers:
            return Decision(wait=True)
        target = min(workers, key=lambda w: (w.load, w.worker_id))
        if adapter in target.resident:
            return Decision(pin=target.worker_id)
        if adapter in target.pending:
            return Decision(wait=True, pin=target.worker_id)
        if target.free > 0:
            return Decision(load=Load(target.worker_id), wait=True, pin=target.worker_id)
        victim = _least_recently_used([target], now, 0.0)
        if victim is not None:
            return Decision(load=Load(target.worker_id, evict=victim[1]), wait=True,
                            pin=target.worker_id)
        holders = [w for w in workers if adapter in w.resident]
        return Decision(wait=not holders)

    def shrink(self, workers: Sequence[Slots], now: float) -> list[tuple[str, str]]:
        return []


PLACEMENTS: dict[str, Callable[[], PlacementPolicy]] = {
    DemandPlacement.name: DemandPlacement,
    NaivePlacement.name: NaivePlacement,
}
