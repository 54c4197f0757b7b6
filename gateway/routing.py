"""Routing policies: given the candidate workers for a request, pick one and say why.

Each policy is a small object behind one interface, testable without a server:
- least-load: power-of-two choices over a load score;
- round-robin;
- cache-aware: the shortest wait for the first token, from what each engine holds of the
  prompt (its own KV events, or an approximate per-worker prefix tree) and its prefill backlog;
- session: consistent hashing on a session key, so a leaving worker moves only its sessions.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

from controller.protocol import WorkerRecord
from fleetcore.kv_blocks import chain_keys
from gateway.kv_view import KvView, KvViews
from gateway.placement import Estimate, Placement
from gateway.prefix_tree import PrefixTree, block_keys
from gateway.prompt_tokens import PromptIds, PromptTokenizer

# Bytes of prompt text per token, for a prompt the gateway cannot tokenise.
CHARS_PER_TOKEN = 4.0


@dataclass
class RouteRequest:
    """What a policy may look at. The prompt text is rendered only if a policy asks for it."""

    model: str
    session: str | None = None
    path: str | None = None  # the engine endpoint; None: any worker of the model
    worker_id: str | None = None  # only this worker (it holds what the request is about)
    adapter: str | None = None  # the LoRA adapter it names (then `model` is that adapter)
    # Among the workers it may go to, these first if any of them can take it now.
    prefer: frozenset[str] = frozenset()
    render_prompt: Callable[[], str] = field(default=lambda: "", repr=False)
    prompt_ids: PromptIds | None = field(default=None, repr=False)
    _ids: dict[int, list[int] | None] = field(default_factory=dict, repr=False)

    @cached_property
    def prompt(self) -> str:
        return self.render_prompt()

    def token_ids(self, tokenizer: PromptTokenizer | None) -> list[int] | None:
        """The prompt as `tokenizer` makes it, worked out once per request (a retry reuses
        it); None without a tokenizer, or for a prompt it cannot render."""
        if tokenizer is None or self.prompt_ids is None:
            return None
        if id(tokenizer) not in self._ids:
            try:
                self._ids[id(tokenizer)] = self.prompt_ids(tokenizer)
            except Exception:  # a template that fails on this chat: route on the estimate
                self._ids[id(tokenizer)] = None
        return self._ids[id(tokenizer)]


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
    """Send a prompt where it waits least for its first token, counting what each engine
    already holds of it (gateway/placement.py).

    What an engine holds comes from its own KV events (gateway/kv_view.py) where its worker
    publishes them and the gateway has the model's tokenizer; otherwise from an approximate
    tree of the prompts this gateway sent there. Either way the prompt just routed counts as
    held for `pending_s` seconds, until the engine's own events can say so: the next prompt
    with the same prefix then sees it there, with its prefill ahead of it."""

    name = "cache-aware"

    def __init__(
        self, *, views: KvViews | None = None, max_blocks_per_worker: int = 100_000,
        block_bytes: int = 64, pending_s: float = 10.0, rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.views = views
        self.placement = Placement(clock)
        self._clock = clock
        self._pending_s = pending_s
        self._trees: dict[str, PrefixTree] = {}
        self._pending: dict[str, dict[int, float]] = {}  # worker: key, until
        self._pending_epochs: dict[str, str | None] = {}
        self._max_blocks = max_blocks_per_worker
        self._block_bytes = block_bytes
        self._rng = rng or random.Random()

    def _tree(self, worker_id: str) -> PrefixTree:
        tree = self._trees.get(worker_id)
        if tree is None:
            tree = self._trees[worker_id] = PrefixTree(self._max_blocks)
        return tree

    def forget(self, live_worker_ids: set[str]) -> None:
        for held in (self._trees, self._pending, self._pending_epochs):
            for wid in set(held) - live_worker_ids:
                del held[wid]
        self.placement.forget(live_worker_ids)

    def _held(self, worker_id: str, view: KvView, keys: Sequence[int]) -> int:
        if self._pending_epochs.get(worker_id) != view.epoch:
            # The engine's cache started over: what was sent before is gone with it.
            self._pending.pop(worker_id, None)
            self._pending_epochs[worker_id] = view.epoch
        pending = self._pending.get(worker_id, {})
        now = self._clock()
        matched = 0
        for key in keys:
            if key not in view.keys and pending.get(key, 0.0) <= now:
                break
            matched += 1
        return matched

    def _hold(self, worker_id: str, keys: Sequence[int]) -> None:
        pending = self._pending.setdefault(worker_id, {})
        now = self._clock()
        if len(pending) > 4 * self._max_blocks:
            for key in [k for k, until in pending.items() if until <= now]:
                del pending[key]
        until = now + self._pending_s
        for key in keys:
            pending[key] = until

    def choose(
        self, request: RouteRequest, candidates: Sequence[WorkerRecord],
        inflight: Mapping[str, int],
    ) -> Choice:
        # An adapter's KV cache is its own: the same prompt under another adapter (or the
        # base model) is another prefix, so prefixes are keyed by worker and adapter. The
        # engines' views (blocks of token ids) do not tell adapters apart: a request for an
        # adapter is matched on the estimate alone.
        adapter = request.adapter
        prompt = request.prompt if adapter is None else f"{adapter}\0{request.prompt}"
        ids = request.token_ids(self.views.tokenizer(request.model)) \
            if self.views and adapter is None else None
        views = {w.worker_id: self.views.view(w.worker_id) for w in candidates} \
            if self.views is not None and ids else {}
        text_keys: list[bytes] | None = None
        chains: dict[int, list[int]] = {}  # block size: the prompt's keys
        held: dict[str, float] = {}  # worker: share of the prompt its engine holds
        first_unheld: dict[str, bytes | None] = {}  # worker: the key of its first missing block
        for worker in candidates:
            view = views.get(worker.worker_id)
            if ids and view is not None and view.block_size:
                keys = chains.setdefault(view.block_size, chain_keys(ids, view.block_size))
                matched = self._held(worker.worker_id, view, keys)
                held[worker.worker_id] = matched * view.block_size / len(ids)
                first_unheld[worker.worker_id] = b"%d:%d" % (view.block_size, keys[matched]) \
                    if matched < len(keys) else None
            else:
                if text_keys is None:
                    text_keys = block_keys(prompt, self._block_bytes)
                matched = self._tree(worker.worker_id).match(text_keys)
                held[worker.worker_id] = matched / len(text_keys) if text_keys else 0.0
                first_unheld[worker.worker_id] = text_keys[matched] \
                    if matched < len(text_keys) else None
        tokens = float(len(ids)) if ids else len(request.prompt.encode()) / CHARS_PER_TOKEN
        estimates = self.placement.estimates(
            candidates, lambda w: tokens * (1.0 - held[w.worker_id]), tokens)
        best = min(estimates, key=lambda e: (
            round(e.wait, 6), -held[e.worker.worker_id], inflight.get(e.worker.worker_id, 0),
            self._tree(e.worker.worker_id).size + len(self._pending.get(e.worker.worker_id, ())),
            self._rng.random()))
        best = self._agreed(estimates, best, held, first_unheld)
        self.placement.sent(best)
        wid = best.worker.worker_id
        chosen_view = views.get(wid)
        from_engine = chosen_view is not None and chosen_view.block_size in chains
        if chosen_view is not None and chosen_view.block_size in chains:
            self._hold(wid, chains[chosen_view.block_size])
        else:
            self._tree(wid).insert(text_keys if text_keys is not None
                                   else block_keys(prompt, self._block_bytes))
        source = "engine" if from_engine else "estimate"
        learned = "" if best.worker.load.prefill_tokens_per_s else ", assumed"
        others = ", ".join(f"{e.worker.worker_id} {e.wait:.2f}s" for e in estimates
                           if e is not best)
        return Choice(best.worker, f"holds {held[wid]:.2f} ({source}), prefill wait "
                      f"{best.wait:.2f}s at {best.rate:.0f} tokens/s{learned}, "
                      f"backlog {best.backlog:.0f} tokens; "
                      f"others: {others}")

    @staticmethod
    def _agreed(estimates: Sequence[Estimate], best: Estimate, held: Mapping[str, float],
                first_unheld: Mapping[str, bytes | None]) -> Estimate:
        """For a prompt new to every worker, the one that rendezvous hashing of its first
        block picks, unless its wait is longer than the best's by more than its own prefill
        of the prompt.

        Gateways do not see each other's choices until the engines report them, so a burst
        of new prefixes split between gateways by load alone sends one prefix to two engines,
        computing it twice; the hash makes them choose alike without a word between them.
        The bound keeps the balance: a worker that falls behind by more than one prompt's
        prefill is passed over, as before. A prompt some worker holds part of goes by the
        wait alone (a burst of one prefix spreads by it)."""
        key = first_unheld.get(best.worker.worker_id)
        if len(estimates) < 2 or key is None or any(held.values()) \
                or any(first_unheld.get(e.worker.worker_id) != key for e in estimates):
            return best
        preferred = max(estimates, key=lambda e: _hash64_bytes(key, e.worker.worker_id))
        if preferred is best or preferred.wait > best.wait + preferred.uncached / preferred.rate:
            return best
        return preferred

    # For gateways that share placement (gateway/shared_state.py): what another gateway sent.

    def prefix_keys(self, prompt: str) -> list[bytes]:
        return block_keys(prompt, self._block_bytes)

    def learn(self, worker_id: str, keys: Sequence[bytes]) -> None:
        """Another gateway sent a prompt with these prefix keys to `worker_id`."""
        self._tree(worker_id).insert(keys)


def _hash64_bytes(key: bytes, worker_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(key + b"|" + worker_id.encode(),
                                          digest_size=8).digest(), "big")


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
