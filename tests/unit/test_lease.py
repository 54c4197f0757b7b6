"""A request's hold on a worker: taken by `acquire`, settled once, whatever the outcome.

Property tests drive random sequences of acquires, answers and outcomes (settled once, or
again) against the routing table, and check what must balance: in-flight per worker is the
number of unsettled leases, never below zero, back to zero at the end; a half-open breaker's
trial is never left out by a request that gave no verdict; latency is told once per answer.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.protocol import Snapshot, WorkerRecord, WorkerState
from fleetcore.errors import FleetError, OverloadedError
from gateway.asgi import ClientWatch, RelayResponse
from gateway.breaker import Breakers, BreakerState
from gateway.engine_client import EngineClient
from gateway.metrics import GatewayMetrics
from gateway.proxy import Proxy
from gateway.routed_request import RoutedRequest
from gateway.routing import LeastLoad, RouteRequest
from gateway.routing_table import Lease, Limits, Outcome, RoutingTable

WORKERS = ("a", "b", "c")


def _worker(wid: str) -> WorkerRecord:
    return WorkerRecord(worker_id=wid, engine_url="http://127.0.0.1:9", model_names=["m"],
                        state=WorkerState.READY, registered_at=0.0, last_heartbeat=0.0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _table(clock: Clock, limits: Limits | None = None) -> tuple[RoutingTable, list[str]]:
    table = RoutingTable(LeastLoad(random.Random(0)),
                         breakers=Breakers(threshold=2, cooldown=1.0, clock=clock),
                         limits=limits)
    table.update(Snapshot(generation=1, heartbeat_interval=2, expiry=6, models=["m"],
                          workers=[_worker(w) for w in WORKERS]))
    told: list[str] = []
    table.on_latency = lambda model, seconds: told.append(model)
    return table, told


def _acquire(table: RoutingTable) -> Lease:
    """`acquire` without a cap never waits: run it to its end without an event loop."""
    coro = table.acquire(RouteRequest(model="m"))
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    raise AssertionError("acquire waited with no in-flight cap")


def _check_balance(table: RoutingTable, leases: list[Lease]) -> None:
    open_leases = [lease for lease in leases if lease.outcome is None]
    for wid in WORKERS:
        held = sum(1 for lease in open_leases if lease.worker_id == wid)
        assert table.inflight[wid] == held
        if held == 0:
            breaker = table.breakers[wid]
            # Half-open with nobody holding the trial must let the next request try.
            assert breaker.state is not BreakerState.HALF_OPEN or breaker.allows()
    assert all(count > 0 for count in table.inflight.values())


_OPS = st.one_of(
    st.tuples(st.just("acquire")),
    st.tuples(st.just("answer"), st.integers(0, 50)),
    st.tuples(st.just("settle"), st.integers(0, 50), st.sampled_from(Outcome)),
    st.tuples(st.just("tick"), st.floats(0.0, 2.0)),
)


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(_OPS, max_size=80), last=st.lists(st.sampled_from(Outcome), min_size=80,
                                                      max_size=80))
def test_inflight_balances_over_any_sequence_of_outcomes(ops: list[tuple], last: list[Outcome]
                                                          ) -> None:
    clock = Clock()
    table, told = _table(clock)
    leases: list[Lease] = []
    settled_first = 0
    for op in ops:
        if op[0] == "acquire":
            try:
                leases.append(_acquire(table))
            except FleetError:
                pass  # every breaker open: nothing was taken
        elif op[0] == "tick":
            clock.now += op[1]
        elif leases:
            lease = leases[op[1] % len(leases)]
            if op[0] == "answer":
                lease.answered()
            else:
                was_open = lease.outcome is None
                assert lease.settle(op[2]) is was_open
                settled_first += was_open
        _check_balance(table, leases)
    for lease, outcome in zip(leases, last * (len(leases) // len(last) + 1), strict=False):
        lease.settle(outcome)
        lease.settle(Outcome.DONE)  # a second settle changes nothing
    _check_balance(table, leases)
    assert not table.inflight
    answered = sum(1 for lease in leases if lease.answered_at is not None)
    assert len(told) == answered


@pytest.mark.parametrize("outcome, state", [
    (Outcome.CONNECT_ERROR, BreakerState.OPEN),
    (Outcome.STREAM_BROKE, BreakerState.OPEN),
    (Outcome.TIMEOUT, BreakerState.CLOSED),  # opens only after `threshold` in a row
    (Outcome.DONE, BreakerState.CLOSED),
    (Outcome.CLIENT_GONE, BreakerState.CLOSED),
])
def test_each_outcome_tells_the_breaker_what_it_means(outcome: Outcome,
                                                      state: BreakerState) -> None:
    table, _ = _table(Clock())
    lease = _acquire(table)
    lease.settle(outcome)
    assert table.breakers[lease.worker_id].state is state


def test_a_failure_after_the_answer_began_still_counts_once() -> None:
    table, told = _table(Clock())
    lease = _acquire(table)
    lease.answered()
    lease.settle(Outcome.STREAM_BROKE)
    lease.answered()  # too late: nothing changes
    assert table.breakers[lease.worker_id].state is BreakerState.OPEN
    assert told == ["m"] and not table.inflight


def test_a_trial_whose_client_left_lets_the_next_request_try() -> None:
    clock = Clock()
    table, _ = _table(clock)
    for wid in WORKERS:
        table.breakers[wid].record_failure(fatal=True)
    clock.now += 1.0  # past the cooldown: half-open
    trial = _acquire(table)
    assert not table.breakers[trial.worker_id].allows()
    trial.settle(Outcome.CLIENT_GONE)
    assert table.breakers[trial.worker_id].allows()


@settings(max_examples=40, deadline=None)
@given(plan=st.lists(st.tuples(st.sampled_from(Outcome), st.booleans(), st.integers(0, 3)),
                     min_size=1, max_size=30))
def test_queued_and_cancelled_requests_balance_under_a_cap(
        plan: list[tuple[Outcome, bool, int]]) -> None:
    """Requests under an in-flight cap of one per worker, some cancelled while queued or while
    holding a worker: the cap holds throughout, and everything is given back."""

    async def scenario() -> None:
        table, _ = _table(Clock(), Limits(max_inflight_per_worker=1, queue_size=64,
                                          queue_timeout=5))
        peak = 0

        async def one(outcome: Outcome, cancel: bool, turns: int) -> None:
            nonlocal peak
            lease = await table.acquire(RouteRequest(model="m"))
            try:
                peak = max(peak, *table.inflight.values())
                for _ in range(turns):
                    await asyncio.sleep(0)
            finally:
                # A cancelled holder settles as the proxy's catch-all does.
                lease.settle(Outcome.CANCELLED if cancel else outcome)

        tasks = [asyncio.create_task(one(*step)) for step in plan]
        await asyncio.sleep(0)
        for task, (_, cancel, _) in zip(tasks, plan, strict=True):
            if cancel:
                task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(r is None or isinstance(r, asyncio.CancelledError | OverloadedError |
                                           FleetError) for r in results)
        assert peak <= 1
        assert not table.inflight and not table.queued

    asyncio.run(scenario())


def test_a_relay_that_never_began_still_runs_its_close() -> None:
    """The client left before the response's headers went out: the body generator never ran,
    so its `finally` cannot settle; the response's `on_close` does."""
    ran, closed = [], []

    async def body():  # type: ignore[no-untyped-def]
        ran.append(True)
        yield b"data: x\n\n"

    async def send(message: dict) -> None:
        raise OSError("client gone")

    async def receive() -> dict:
        return {"type": "http.disconnect"}

    response = RelayResponse(body(), 200, {}, "text/event-stream",
                             on_close=lambda: closed.append(True))
    with pytest.raises(OSError):
        asyncio.run(response({"type": "http"}, receive, send))
    assert closed == [True] and ran == []


def test_every_close_of_a_relay_runs_even_when_one_fails() -> None:
    """The proxy's close (the lease) and the pipeline's (the key's slot) both run, in order,
    though the first raises: a bug in one must not leak what the other holds."""
    ran: list[str] = []

    async def body():  # type: ignore[no-untyped-def]
        yield b"data: x\n\n"

    async def send(message: dict) -> None:
        pass

    async def receive() -> dict:
        return {"type": "http.disconnect"}

    def failing() -> None:
        ran.append("proxy")
        raise RuntimeError("a bug in a close")

    response = RelayResponse(body(), 200, {}, "text/event-stream", on_close=failing)
    response.add_close(lambda: ran.append("pipeline"))
    asyncio.run(response({"type": "http"}, receive, send))
    assert ran == ["proxy", "pipeline"]


def test_a_request_cancelled_while_waiting_for_the_engine_gives_its_worker_back() -> None:
    """Cancelling the request's task (the server shutting down) mid-send: the proxy's
    catch-all settles the lease that no branch foresaw."""
    class SilentEngines(EngineClient):
        async def request(self, *args: object, **kwargs: object):  # type: ignore[override]
            sent.set()
            await asyncio.Event().wait()  # never answers

    sent = asyncio.Event()

    async def receive() -> dict:
        await asyncio.Event().wait()  # the client stays
        return {}

    async def scenario() -> tuple[dict[str, int], bool]:
        table, _ = _table(Clock())
        engines = SilentEngines(connect_timeout=1, read_timeout=60, dead_peer_timeout=10)
        proxy = Proxy(engines, table, GatewayMetrics(table), max_attempts=3)
        routed = RoutedRequest(request_id="r", started=0.0, path="/v1/chat/completions",
                               route=RouteRequest(model="m"))
        task = asyncio.create_task(proxy.forward(routed, ClientWatch(receive)))
        await asyncio.wait_for(sent.wait(), 5)
        held = dict(table.inflight)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not table.inflight
        return held, all(table.breakers[w].allows() for w in WORKERS)

    held, allowed = asyncio.run(scenario())
    assert sum(held.values()) == 1 and allowed
