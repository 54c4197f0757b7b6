"""Several controllers: workers register with each; gateways sync from the first that answers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator

import aiohttp
import httpx
import pytest
import uvicorn

from controller.app import create_app as create_controller
from controller.protocol import Registration
from controller.settings import ControllerSettings
from gateway.controller_sync import ControllerSync
from gateway.routing import LeastLoad
from gateway.routing_table import RoutingTable
from worker.registration import ControllerClient
from worker.service import Worker
from worker.settings import WorkerSettings


class FakeController:
    """Records calls; answers heartbeats 404 once `forget()` was called."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.known = False

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(f"{request.method} {request.url.path}")
        if request.url.path == "/workers/register":
            Registration.model_validate_json(request.content)
            self.known = True
            return httpx.Response(200, json={"worker_id": "w", "heartbeat_interval": 1.5,
                                             "expiry": 5})
        if request.url.path.endswith("/heartbeat"):
            return httpx.Response(200 if self.known else 404, json={})
        return httpx.Response(200, json={})


def test_worker_registers_with_every_controller_and_again_with_one_that_forgot() -> None:
    a, b = FakeController(), FakeController()
    worker = Worker(WorkerSettings(model="org/m", worker_id="w",
                                   controller_address="http://a:1,http://b:2"))
    worker.engine_url = "http://127.0.0.1:9"

    async def scenario() -> None:
        routes = {"a": a, "b": b}
        transport = httpx.MockTransport(lambda r: routes[r.url.host].handler(r))
        async with httpx.AsyncClient(transport=transport) as client:
            worker._controllers = [ControllerClient(addr, client)
                                   for addr in worker.settings.controller_addresses]
            await worker._report()
            b.known = False  # b restarted
            await worker._report()

    asyncio.run(scenario())
    assert a.calls == ["POST /workers/register", "POST /workers/w/heartbeat"]
    assert b.calls == ["POST /workers/register", "POST /workers/w/heartbeat",
                       "POST /workers/register"]
    assert worker.heartbeat_interval == 1.5


@pytest.fixture
def controller_url() -> Iterator[str]:
    server = uvicorn.Server(uvicorn.Config(create_controller(ControllerSettings()),
                                           host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = 100
    while not server.started and deadline:
        deadline -= 1
        threading.Event().wait(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    httpx.post(f"http://127.0.0.1:{port}/workers/register", json={
        "worker_id": "w1", "engine_url": "http://127.0.0.1:9", "model_names": ["m"],
        "state": "ready"}).raise_for_status()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(5)


def test_gateway_syncs_from_the_controller_that_answers(controller_url: str) -> None:
    table = RoutingTable(LeastLoad())

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            sync = ControllerSync(table, session, ["http://127.0.0.1:9", controller_url],
                                  interval=0.05)
            task = asyncio.create_task(sync.run_forever())
            deadline = asyncio.get_running_loop().time() + 5
            while table.snapshot is None:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.01)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(scenario())
    assert [w.worker_id for w in table.models()["m"]] == ["w1"]
    assert not table.stale
    assert json.loads(table.snapshot.model_dump_json())["warming_up"] is True
