"""Routing policies: given the candidate workers for a request, pick one and say why.

Each policy is a small object behind one interface, testable without a server:
- least-load: power-of-two choices over a load score;
- round-robin;
- cache-aware: longest prefix match on an approximate per-worker prefix tree, with an imbalance
  guard that falls back to least-load (like SGLang's balance_abs/rel thresholds);
- session: consistent hashing on a session key, so a leaving worker moves only its sessions.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

from controller.protocol import WorkerRecord
from gateway.prefix_tree import PrefixTree, block_keys


@dataclass
class RouteRequest:
    """What a policy may look at. The prompt text is rendered only if a policy asks for it."""

    model: str
    session: str | None = None
    path: str | None = None  # the engine endpoint; None: any worker of the model
    worker_id: str | None = None  # only this worker (it holds what the request is about)
    adapter: str | None = None  # the LoRA adapter it names (then `model` is that adapter)
    render_prompt: Callable[[], str] = field(default=lambda: "", repr=False)

    @cached_property
    def prompt(self) -> str:
        return self.render_prompt()


@dataclass(frozen=True)
class Choice:
    worker: WorkerRecord
    reason: str


class RoutingPolicy(Protocol):
    name: str

    def choose(
        self, request: RouteRequest, candidates: Sequence[WorkerRecord],
        inflight: Mapping[str, int],
    ) -> Choice: ...

    def forget(self, live_worker_ids: set[str]) -> None:
        """Drop what the policy keeps about workers not in `live_worker_ids` (they left)."""


def load_score(worker: WorkerRecord, inflight: Mapping[str, int]) -> float:
    """Our own requests in flight to the worker, plus its engine queue and KV-cache pressure."""
    load = worker.load
    return inflight.get(worker.worker_id, 0) + load.waiting + 2.0 * load.kv_cache_usage


class LeastLoad:
    """Power-of-two choices: the better of two random candidates, so that many gateways
    acting on the same stale loads do not all pile onto the one least-loaded worker."""

    name = "least-load"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(
        self, request: RouteRequest, candidates: Sequence[WorkerRecord],
        inflight: Mapping[str, int],
    ) -> Choice:
        if len(candidates) == 1:
            return Choice(candidates[0], "only candidate")
        a, b = self._rng.sample(list(candidates), 2)
        sa, sb = load_score(a, inflight), load_score(b, inflight)
        best, score, other = (a, sa, sb) if sa <= sb else (b, sb, sa)
        return Choice(best, f"load {score:.1f} vs {other:.1f}")

    def forget(self, live_worker_ids: set[str]) -> None:
        pass  # keeps nothing per worker


class RoundRobin:
    name = "round-robin"

    def __init__(self) -> None:
        self._counters: dict[str, itertools.count[int]] = {}

    def choose(
        self, request: RouteRequest, candidates: Sequence[WorkerRecord],
        inflight: Mapping[str, int],
    ) -> Choice:
        counter = self._counters.setdefault(request.model, itertools.count())
        ordered = sorted(candidates, key=lambda w: w.worker_id)
        return Choice(ordered[next(counter) % len(ordered)], "next in turn")

    def forget(self, live_worker_ids: set[str]) -> None:
        pass  # counts per model, not per worker


class CacheAware:
    """Send a prompt where its prefix most likely sits in the engine's prefix cache."""

    name = "cache-aware"

    def __init__(
        self, *, match_threshold: float = 0.5, balance_abs: float = 16.0,
        balance_rel: float = 1.5, max_blocks_per_worker: int = 100_000,
        block_bytes: int = 64, rng: random.Random | None = None,
    ) -> None:
        self.match_threshold = match_threshold
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self._trees: dict[str, PrefixTree] = {}
        self._max_blocks = max_blocks_per_worker
        self._block_bytes = block_bytes
        self._fallback = LeastLoad(rng)

    def _tree(self, worker_id: str) -> PrefixTree:
        tree = self._trees.get(worker_id)
        if tree is None:
            tree = self._trees[worker_id] = PrefixTree(self._max_blocks)
        return tree

    def forget(self, live_worker_ids: set[str]) -> None:
        for wid in set(self._trees) - live_worker_ids:
            del self._trees[wid]

    def overloaded(self, worker: WorkerRecord, candidates: Sequence[WorkerRecord],
                   inflight: Mapping[str, int]) -> bool:
        """Is `worker` too far above the least-loaded candidate to be worth its cache hits?

        Both thresholds must be passed: the absolute one keeps small loads from flapping, the
        relative one scales with the load.
        """
        load = load_score(worker, inflight)
        low = min(load_score(w, inflight) for w in candidates)
        return load - low > self.balance_abs and load > low * self.balance_rel

    def choose(
        self, request: RouteRequest, candidates: Sequence[WorkerRecord],
        inflight: Mapping[str, int],
    ) -> Choice:
        # An adapter's KV cache is its own: the same prompt under another adapter (or the
        # base model) is another prefix, so prefixes are keyed by worker and adapter.
        prompt = request.prompt if request.adapter is None else \
            f"{request.adapter}\0{request.prompt}"
        keys = block_keys(prompt, self._block_bytes)
        matches = {w.worker_id: self._tree(w.worker_id).match(keys) for w in candidates}
        best = max(matches.values())
        ratio = best / len(keys) if keys else 0.0
        if ratio >= self.match_threshold:
            tied = [w for w in candidates if matches[w.worker_id] == best]
            worker = min(tied, key=lambda w: load_score(w, inflight))
            choice = Choice(worker, f"prefix match {ratio:.2f}")
            if self.overloaded(worker, candidates, inflight):
                fallback = self._fallback.choose(request, candidates, inflight)
                choice = Choice(fallback.worker, f"prefix match {ratio:.2f} on "
                                f"{worker.worker_id}, but imbalanced: least-load "
                                f"{fallback.reason}")
        else:
            # No worker holds enough of it: the least-cached worker has the most room, unless
            # it is the busy one.
            worker = min(candidates, key=lambda w: (self._tree(w.worker_id).size,
                                                    load_score(w, inflight)))
            choice = Choice(worker, f"prefix match {ratio:.2f} < {self.match_threshold}, "
                                    "least cached")
            if self.overloaded(worker, candidates, inflight):
                fallback = self._fallback.choose(request, candidates, inflight)
                choice = Choice(fallback.worker, f"least cached {worker.worker_id} is busy: "
                                f"least-load {fallback.reason}")
        self._tree(choice.worker.worker_id).insert(keys)
        return choice


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class SessionAffinity:
    """Consistent hashing of the session key onto a ring of virtual nodes per worker."""

    name = "session"

    def __init__(self, virtual_nodes: int = 64, rng: random.Random | None = None) -> None:
        self._virtual_nodes = virtual_nodes
        self._fallback = LeastLoad(rng)
        self._ring_key: tuple[str, ...] = ()
        self._ring: list[tuple[int, str]] = []

    def _build(self, worker_ids: tuple[str, ...]) -> None:
        if worker_ids != self._ring_key:
            self._ring = sorted(
                (_hash64(f"{wid}#{i}"), wid)
                for wid in worker_ids for i in range(self._virtual_nodes)
            )
            self._ring_key = worker_ids

    def choose(
        self, request: RouteRequest, candidates: Sequence[WorkerRecord],
        inflight: Mapping[str, int],
    ) -> Choice:
        if not request.session:
            choice = self._fallback.choose(request, candidates, inflight)
            return Choice(choice.worker, f"no session key, least-load: {choice.reason}")
        by_id = {w.worker_id: w for w in candidates}
        self._build(tuple(sorted(by_id)))
        point = _hash64(request.session)
        index = bisect.bisect(self._ring, (point, "")) % len(self._ring)
        return Choice(by_id[self._ring[index][1]], "session hash")

    def forget(self, live_worker_ids: set[str]) -> None:
        pass  # the ring is rebuilt from each request's candidates


POLICIES: dict[str, Callable[[], RoutingPolicy]] = {
    LeastLoad.name: LeastLoad,
    RoundRobin.name: RoundRobin,
    CacheAware.name: CacheAware,
    SessionAffinity.name: SessionAffinity,
}


def make_policy(name: str) -> RoutingPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; choose from "
                         f"{', '.join(POLICIES)}") from None
