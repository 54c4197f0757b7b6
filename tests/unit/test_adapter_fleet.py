"""The gateway's adapter placement against engines that answer vLLM's load/unload endpoints
(gateway/adapters.py): one load for many requests at once, eviction of the least recently used
idle adapter only, bounded waits, and what the routing table then routes to."""

from __future__ import annotations

import asyncio
import collections
import random
from collections.abc import AsyncIterator

import pytest
from aiohttp import ClientSession, web

from controller.protocol import AdapterSpec, Snapshot, WorkerRecord, WorkerState
from fleetcore.errors import NotFoundError, ServiceUnavailableError
from gateway.adapters import AdapterFleet
from gateway.lora_placement import DemandPlacement
from gateway.routing import LeastLoad, RouteRequest
from gateway.routing_table import Outcome, RoutingTable

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeEngines:
    """Engines that hold adapters by name; loads wait for `gate` when it is set."""

    def __init__(self) -> None:
        self.held: dict[str, set[str]] = collections.defaultdict(set)
        self.calls: list[tuple[str, str, str]] = []
        self.gate: asyncio.Event | None = None
        self.fail: set[str] = set()

    def app(self, wid: str) -> web.Application:
        async def load(request: web.Request) -> web.Response:
            body = await request.json()
            self.calls.append((wid, "load", body["lora_name"]))
            if self.gate is not None:
                await self.gate.wait()
            if body["lora_name"] in self.fail:
                return web.Response(status=400, text="invalid adapter")
            if body["lora_name"] in self.held[wid]:
                return web.Response(status=400, text="has already been loaded")
            self.held[wid].add(body["lora_name"])
            return web.Response(text="ok")

        async def unload(request: web.Request) -> web.Response:
            body = await request.json()
            self.calls.append((wid, "unload", body["lora_name"]))
            if body["lora_name"] not in self.held[wid]:
                return web.Response(status=404, text="not found")
            self.held[wid].discard(body["lora_name"])
            return web.Response(text="ok")

        async def chat(request: web.Request) -> web.Response:
            body = await request.json()
            if body["model"] not in self.held[wid]:
                return web.json_response({"error": {"message": "no such model"}}, status=404)
            return web.json_response({"choices": [], "served_by": wid})

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_post("/v1/load_lora_adapter", load)
        app.router.add_post("/v1/unload_lora_adapter", unload)
        return app

    def loads(self) -> list[tuple[str, str]]:
        return [(w, a) for w, kind, a in self.calls if kind == "load"]


def _snapshot(ports: dict[str, int], adapters: list[str], generation: int = 1) -> Snapshot:
    workers = [WorkerRecord(worker_id=wid, engine_url=f"http://127.0.0.1:{port}",
                            model_names=["m"], state=WorkerState.READY, lora_slots=1,
                            registered_at=0.0, last_heartbeat=0.0)
               for wid, port in ports.items()]
    return Snapshot(generation=generation, heartbeat_interval=1, expiry=3, models=["m"],
                    workers=workers,
                    adapters=[AdapterSpec(name=a, source=f"/adapters/{a}", base_model="m")
                              for a in adapters])


@pytest.fixture
async def fleet() -> AsyncIterator[tuple[RoutingTable, AdapterFleet, FakeEngines]]:
    engines = FakeEngines()
    runners, ports = [], {}
    for wid in ("w0", "w1"):
        runner = web.AppRunner(engines.app(wid))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ports[wid] = runner.addresses[0][1]
        runners.append(runner)
    table = RoutingTable(LeastLoad(random.Random(0)))
    adapters = AdapterFleet(table, DemandPlacement(spread_at=100), wait_timeout=0.5)
    table.adapters = adapters
    table.update(_snapshot(ports, ["x", "y", "z"]))
    async with ClientSession() as session:
        adapters.session = session
        yield table, adapters, engines
    for runner in runners:
        await runner.cleanup()


async def test_many_requests_at_once_load_an_adapter_once(fleet: tuple) -> None:
    table, adapters, engines = fleet
    engines.gate = asyncio.Event()
    routes = [RouteRequest(model="x") for _ in range(20)]
    waiting = [asyncio.create_task(adapters.ensure(r)) for r in routes]
    await asyncio.sleep(0.05)
    assert not any(t.done() for t in waiting)  # they wait for the load
    engines.gate.set()
    await asyncio.gather(*waiting)
    assert len(engines.loads()) == 1
    (holder, _), = engines.loads()
    assert [w.worker_id for w in table.candidates("x")] == [holder]
    assert all(r.adapter == "x" for r in routes)
    assert adapters.loads[("x", "first_use")] == 1


async def test_full_slots_evict_the_least_recently_used_idle_adapter(fleet: tuple) -> None:
    table, adapters, engines = fleet
    for name in ("x", "y"):
        await adapters.ensure(RouteRequest(model=name))
    assert sorted(a for _, a in engines.loads()) == ["x", "y"]
    holder_of = {a: w for w, a in engines.loads()}
    # x is in flight: z must take y's slot, though y was used after x.
    lease = await table.acquire(RouteRequest(model="x", adapter="x"))
    await adapters.ensure(RouteRequest(model="z"))
    assert (holder_of["y"], "unload", "y") in engines.calls
    assert [w.worker_id for w in table.candidates("z")] == [holder_of["y"]]
    with pytest.raises(ServiceUnavailableError):
        table.candidates("y")  # declared, held nowhere now
    lease.settle(Outcome.DONE)
    assert ("x", "evict") not in adapters.unloads


async def test_a_copys_heat_counts_its_requests_and_halves_each_half_life(fleet: tuple
                                                                         ) -> None:
    table, adapters, engines = fleet
    now = [0.0]
    adapters._clock = lambda: now[0]
    adapters._heat_half_life = 10.0
    await adapters.ensure(RouteRequest(model="x"))
    (holder, _), = engines.loads()
    for _ in range(4):
        (await table.acquire(RouteRequest(model="x", adapter="x"))).settle(Outcome.DONE)
    assert adapters.heat(holder, "x", 0.0) == pytest.approx(4.0)
    now[0] = 10.0
    (await table.acquire(RouteRequest(model="x", adapter="x"))).settle(Outcome.DONE)
    assert adapters.heat(holder, "x", 20.0) == pytest.approx(1.5)
    # What placement sees is the same figure, and an unload forgets it.
    view, = [w for w in adapters._slots("m") if w.worker_id == holder]
    assert view.resident["x"].heat == pytest.approx(3.0)
    await adapters._unload(holder, "x", "evict")
    assert adapters.heat(holder, "x", 20.0) == 0.0


async def test_a_held_adapter_goes_where_the_engine_has_a_batch_slot_for_it(fleet: tuple
                                                                            ) -> None:
    table, adapters, engines = fleet
    adapters.policy = DemandPlacement(spread_at=100, batch_aware=True)
    ports = {w.worker_id: w.engine_url.port for w in table.snapshot.workers}
    snapshot = _snapshot(ports, ["x", "y"], generation=2)
    for w, held in zip(snapshot.workers, (["x", "y"], ["x"]), strict=True):
        w.lora_slots, w.lora_batch_slots, w.adapters = 2, 1, held
    table.update(snapshot)
    # w0 runs y in its one batch slot; w1 runs x twice: least load alone would pick w0.
    leases = [await table.acquire(RouteRequest(model="y", adapter="y", worker_id="w0"))]
    leases += [await table.acquire(RouteRequest(model="x", adapter="x", worker_id="w1"))
               for _ in range(2)]
    route = RouteRequest(model="x")
    await adapters.ensure(route)
    assert route.prefer == {"w1"} and not engines.loads()
    lease = await table.acquire(route)
    assert lease.worker_id == "w1"
    for held in (*leases, lease):
        held.settle(Outcome.DONE)
    route = RouteRequest(model="x")
    await adapters.ensure(route)  # nothing runs now: no preference, least load decides
    assert route.prefer == frozenset()


async def test_a_request_waits_a_bounded_time_when_no_slot_can_be_had(fleet: tuple) -> None:
    table, adapters, engines = fleet
    leases = []
    for name in ("x", "y"):
        route = RouteRequest(model=name)
        await adapters.ensure(route)
        leases.append(await table.acquire(route))
    with pytest.raises(ServiceUnavailableError) as refused:
        await adapters.ensure(RouteRequest(model="z"))
    assert refused.value.headers["Retry-After"]
    assert refused.value.code == "adapter_not_ready"
    # A slot frees while one waits: the waiter gets it.
    waiter = asyncio.create_task(adapters.ensure(RouteRequest(model="z")))
    await asyncio.sleep(0.05)
    leases[0].settle(Outcome.DONE)  # wakes the waiter: no sync needed
    await asyncio.wait_for(waiter, 0.4)
    assert ("z", "first_use") in adapters.loads
    leases[1].settle(Outcome.DONE)


async def test_a_failed_load_is_a_503_that_names_the_cause(fleet: tuple) -> None:
    _, adapters, engines = fleet
    engines.fail.add("x")
    with pytest.raises(ServiceUnavailableError) as failed:
        await adapters.ensure(RouteRequest(model="x"))
    assert failed.value.code == "adapter_load_failed"
    assert "invalid adapter" in failed.value.message
    assert adapters.load_failures["x"] == 1


async def test_an_unknown_name_is_a_404_and_a_base_model_needs_no_placement(fleet: tuple
                                                                           ) -> None:
    table, adapters, engines = fleet
    route = RouteRequest(model="m")
    await adapters.ensure(route)
    assert route.adapter is None and not engines.calls
    await adapters.ensure(RouteRequest(model="nope"))  # not an adapter: the table decides
    with pytest.raises(NotFoundError):
        table.candidates("nope")


async def test_reports_win_once_the_gateways_own_actions_are_old(fleet: tuple) -> None:
    table, adapters, engines = fleet
    await adapters.ensure(RouteRequest(model="x"))
    (holder, _), = engines.loads()
    assert adapters.holders("x") == {holder}
    # A report that lags behind the load does not undo it...
    ports = {w.worker_id: w.engine_url.port for w in table.snapshot.workers}
    table.update(_snapshot(ports, ["x", "y", "z"], generation=2))
    assert adapters.holders("x") == {holder}
    # ...and the engine's own word is taken once this gateway's action is older than `hold`.
    adapters._hold = 0.0
    table.update(_snapshot(ports, ["x", "y", "z"], generation=3))
    assert adapters.holders("x") == set()


async def test_an_adapter_removed_while_requests_wait_is_a_404_to_them(fleet: tuple) -> None:
    table, adapters, engines = fleet
    leases = []
    for name in ("x", "y"):
        route = RouteRequest(model=name)
        await adapters.ensure(route)
        leases.append(await table.acquire(route))
    adapters.wait_timeout = 5.0
    waiter = asyncio.create_task(adapters.ensure(RouteRequest(model="z")))
    await asyncio.sleep(0.05)
    adapters.forget("z")
    adapters.wake()
    with pytest.raises(NotFoundError):
        await waiter
    for lease in leases:
        lease.settle(Outcome.DONE)


async def test_an_undeclared_adapter_still_on_a_worker_is_not_offered(fleet: tuple) -> None:
    table, adapters, engines = fleet
    ports = {w.worker_id: w.engine_url.port for w in table.snapshot.workers}
    snapshot = _snapshot(ports, [], generation=2)
    snapshot.workers[0].adapters = ["gone", "kept"]
    snapshot.workers[0].static_adapters = ["kept"]
    table.update(snapshot)
    assert not adapters.is_adapter("gone")
    assert adapters.is_adapter("kept") and adapters.base_of("kept") == "m"
    # Upkeep unloads what left the catalogue, never a static adapter.
    await asyncio.gather(*adapters.upkeep())
    assert [c for c in engines.calls if c[1] == "unload"] == [("w0", "unload", "gone")]


async def test_an_adapter_the_engine_lost_is_placed_again_and_the_request_answered(
        fleet: tuple) -> None:
    from gateway.asgi import ClientWatch
    from gateway.engine_client import EngineClient
    from gateway.metrics import GatewayMetrics
    from gateway.proxy import Proxy
    from gateway.routed_request import RoutedRequest

    table, adapters, engines = fleet
    await adapters.ensure(RouteRequest(model="x"))
    (holder, _), = engines.loads()
    engines.held[holder].discard("x")  # another gateway unloaded it; the reports lag

    async def receive() -> dict:
        await asyncio.Event().wait()
        return {}

    client = EngineClient(connect_timeout=1, read_timeout=10, dead_peer_timeout=10)
    metrics = GatewayMetrics(table)
    proxy = Proxy(client, table, metrics, max_attempts=3, retry_backoff=0.0)
    route = RouteRequest(model="x")
    await adapters.ensure(route)
    routed = RoutedRequest(request_id="r", started=0.0, path="/v1/chat/completions",
                           body=b'{"model": "x", "messages": []}', route=route)
    try:
        response = await proxy.forward(routed, ClientWatch(receive))
    finally:
        client.close()
    assert response.status_code == 200
    assert len(engines.loads()) == 2  # loaded again, once
    assert metrics.retries.labels("x", "adapter_missing")._value.get() == 1
    assert not table.inflight
