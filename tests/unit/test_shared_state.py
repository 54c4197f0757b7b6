"""Gateways that share state through a real redis-server: fleet-wide key limits, each other's
in-flight counts, each other's prefix placements, and going on alone when the store is gone."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterator

import pytest

from controller.protocol import Snapshot, WorkerLoad, WorkerRecord, WorkerState
from fleetcore.errors import RateLimitError
from gateway.auth import Caller
from gateway.keys import KeyEntry
from gateway.limits import KeyLimiter
from gateway.routing import CacheAware, LeastLoad, RouteRequest
from gateway.routing_table import Outcome, RoutingTable
from gateway.shared_state import Refusal, SharedState, Unreachable
from tests.redis_server import redis_server


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


Pair = tuple[SharedState, SharedState]


def with_pair(redis_url: str, body: Callable[[Pair], Awaitable[None]]) -> None:
    """Run `body` with two gateways' shared state, on a store emptied first."""

    async def run() -> None:
        a = SharedState(redis_url, gateway_id="gw-a")
        b = SharedState(redis_url, gateway_id="gw-b")
        await a._redis.flushdb()
        try:
            await body((a, b))
        finally:
            await a.close()
            await b.close()

    asyncio.run(run())


def _caller(key_id: str, **limits: int) -> Caller:
    return Caller(key_id=key_id, entry=KeyEntry(name=key_id, **limits))


def _worker(wid: str) -> WorkerRecord:
    return WorkerRecord(worker_id=wid, engine_url="http://127.0.0.1:9", model_names=["m"],
                        state=WorkerState.READY, load=WorkerLoad(), registered_at=0.0,
                        last_heartbeat=0.0)


def _table(policy: object, *ids: str) -> RoutingTable:
    table = RoutingTable(policy)  # type: ignore[arg-type]
    table.update(Snapshot(generation=1, heartbeat_interval=2, expiry=6,
                          workers=[_worker(w) for w in ids], models=["m"]))
    return table


def test_a_keys_requests_per_minute_hold_across_gateways(redis_url: str) -> None:
    async def body(pair: Pair) -> None:
        a, b = pair
        verdicts = [await (a if i % 2 else b).admit("k1", 5, None) for i in range(8)]
        assert verdicts[:5] == [None] * 5
        assert all(isinstance(v, Refusal) and v.limit == "rpm" and 0 < v.wait <= 60
                   for v in verdicts[5:])
        assert await a.admit("other-key", 5, None) is None  # each key has its own window

    with_pair(redis_url, body)


def test_tokens_charged_through_one_gateway_limit_the_other(redis_url: str) -> None:
    async def body(pair: Pair) -> None:
        a, b = pair
        assert await b.admit("k2", None, 100) is None
        a.charge("k2", 100)
        await asyncio.gather(*a._tasks)
        refusal = await b.admit("k2", None, 100)
        assert refusal is not None and refusal.limit == "tpm"

    with_pair(redis_url, body)


def test_the_limiter_refuses_fleet_wide_and_goes_on_alone_without_the_store(
        redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    async def body(pair: Pair) -> None:
        a, b = pair
        for shared in (a, b):
            await shared.exchange(_table(LeastLoad(), "w1"))  # finds the store up
        one, two = KeyLimiter(shared=a), KeyLimiter(shared=b)
        caller = _caller("k3", rpm=2)
        await one.acquire(caller)
        await two.acquire(caller)
        with pytest.raises(RateLimitError):
            await one.acquire(caller)
        # The store gone: each gateway counts alone (so `one` has room for its second request).
        gone = SharedState("redis://127.0.0.1:9/0", timeout=0.2, gateway_id="gw-gone")
        gone.up = True  # it was, until now
        alone = KeyLimiter(shared=gone)
        with caplog.at_level(logging.WARNING, "gateway.shared_state"):
            await alone.acquire(caller)  # finds the store gone, and counts locally
            await alone.acquire(caller)
            with pytest.raises(RateLimitError):
                await alone.acquire(caller)
        assert not gone.up and caplog.text.count("goes on alone") == 1
        with pytest.raises(Unreachable):
            await gone.admit("k3", 2, None)
        await gone.close()

    with_pair(redis_url, body)


def test_each_gateway_sees_the_others_in_flight_and_routes_around_it(redis_url: str) -> None:
    async def body(pair: Pair) -> None:
        a, b = pair
        # One gateway holds six requests on w1 (the only worker it routes to).
        busy_side = _table(LeastLoad(random.Random(0)), "w1")
        other = _table(LeastLoad(random.Random(0)), "w1", "w2")
        leases = [await busy_side.acquire(RouteRequest(model="m")) for _ in range(6)]
        await a.exchange(busy_side)
        await b.exchange(other)  # learns that a is a peer
        await b.exchange(other)
        assert other.remote_inflight == {"w1": 6} and not other.inflight
        # The other gateway's policy sees the sum: its new requests go to the idle worker.
        mine = [await other.acquire(RouteRequest(model="m")) for _ in range(3)]
        assert [lease.worker_id for lease in mine] == ["w2"] * 3
        for lease in mine:
            lease.settle(Outcome.DONE)
        for lease in leases:
            lease.settle(Outcome.DONE)
        await a.exchange(busy_side)
        await b.exchange(other)
        assert not other.remote_inflight  # settled there, so no longer counted here
        await a.close()
        await b.exchange(other)
        await b.exchange(other)
        assert not other.remote_inflight  # a gateway gone is no longer counted

    with_pair(redis_url, body)


def test_a_prefix_placed_by_one_gateway_is_found_by_the_other(redis_url: str) -> None:
    async def body(pair: Pair) -> None:
        a, b = pair
        first = _table(CacheAware(), "w1", "w2", "w3")
        second = _table(CacheAware(), "w1", "w2", "w3")
        for table, shared in ((first, a), (second, b)):
            table.on_routed = lambda request, choice, t=table, s=shared: \
                s.routed(t, request, choice)
            await shared.exchange(table)  # up, and caught up with the (empty) stream
        await a.exchange(first)  # a now knows b is there to learn
        prompts = [f"system prompt {n} " * 40 + "question" for n in range(12)]
        placed = {}
        for prompt in prompts:
            lease = await first.acquire(RouteRequest(model="m", render_prompt=lambda p=prompt: p))
            placed[prompt] = lease.worker_id
            lease.settle(Outcome.DONE)
        assert len(set(placed.values())) > 1  # spread over workers, so a match is no accident
        await a.exchange(first)
        await b.exchange(second)
        # In the other order: without what a published, b would place some otherwise (the
        # same gateway with no peer, asked the same).
        alone = _table(CacheAware(), "w1", "w2", "w3")
        for table, check in ((alone, False), (second, True)):
            there = {}
            for prompt in reversed(prompts):
                lease = await table.acquire(RouteRequest(
                    model="m", render_prompt=lambda p=prompt + " and a follow-up": p))
                there[prompt] = lease.worker_id
                lease.settle(Outcome.DONE)
            assert (there == placed) is check, (there, placed)

    with_pair(redis_url, body)
